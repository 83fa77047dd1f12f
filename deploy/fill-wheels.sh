#!/usr/bin/env bash
# Put every wheel the image needs into wheels/, so that `docker build` installs with no index at all
# (air-gapped builds, and builds behind a proxy the container does not trust).
#
#   bash deploy/fill-wheels.sh                    # torch from PyTorch's CPU index, the rest from PyPI
#   TORCH_WHEEL=/opt/wheels/torch-…whl bash deploy/fill-wheels.sh   # use a torch wheel on disk
#
# The wheels are for the image's platform (Linux x86_64, CPython 3.11), whatever the host is.
# Idempotent: wheels already in wheels/ are not downloaded again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
mkdir -p wheels

if [ -n "${TORCH_WHEEL:-}" ]; then
  cp -n "$TORCH_WHEEL" wheels/
fi

# The image installs pyproject.toml's dependencies and build requirements; so do we.
mapfile -t requirements < <("$PYTHON" -c 'import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))')

index_args=()
if ! ls wheels/torch-*.whl >/dev/null 2>&1; then
  index_args=(--extra-index-url "$TORCH_INDEX_URL")
fi

"$PYTHON" -m pip download --quiet --dest wheels --find-links wheels "${index_args[@]}" \
  --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${requirements[@]}"
echo "wheels/: $(ls wheels/*.whl | wc -l) wheels, $(du -sh wheels | cut -f1)"
