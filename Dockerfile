# attnserve: the LitServe server and the shipped checkpoints (calculator, pronouns), CPU only.
#
#   docker build -t attnserve .                   # torch from PyTorch's CPU wheel index
#   bash deploy/fill-wheels.sh && docker build --network host -t attnserve .   # offline: wheels/ only
#   docker run --rm -p 127.0.0.1:8000:8000 attnserve
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs/book:/models/book:ro" \
#       -e ATTNSERVE_CHECKPOINT=/models/book attnserve       # serve another checkpoint instead
#
# Wheels in the build context's wheels/ folder are preferred: when they hold every dependency
# (deploy/fill-wheels.sh puts them there) nothing is downloaded at all; otherwise pip takes the rest
# from PyPI, and torch from TORCH_INDEX_URL unless wheels/ has a torch wheel.
# Kept to few layers on purpose: with the vfs storage driver every layer is a full copy.

ARG PYTHON_IMAGE=python:3.11-slim

# The project's sources, gathered in an empty stage (cheap steps) and copied on in one layer.
FROM scratch AS src
COPY pyproject.toml README.md /
COPY model/ /model/
COPY server/ /server/
COPY clients/ /clients/
COPY checkpoints/calculator/ /checkpoints/calculator/
COPY checkpoints/pronouns/ /checkpoints/pronouns/

# The runtime requirements alone, so that editing other parts of pyproject.toml (dev extras, tool
# settings) keeps the dependency layer below cached.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /tmp/
RUN python -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb")); \
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' > /requirements.txt

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY wheels/ /wheels/
COPY --from=requirements /requirements.txt /tmp/
# Dependencies first, so that a source change rebuilds only the layers below.
RUN set -eu; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore; \
    python -m venv /opt/venv; \
    pip=/opt/venv/bin/pip; \
    if ls /wheels/*.whl >/dev/null 2>&1 && $pip install -q --no-index --find-links /wheels -r /tmp/requirements.txt; then \
        echo "installed every dependency from wheels/ (no index used)"; \
    else \
        echo "wheels/ does not hold every dependency: using the package index for the rest"; \
        extra=""; ls /wheels/torch-*.whl >/dev/null 2>&1 || extra="--extra-index-url $TORCH_INDEX_URL"; \
        $pip install -q --find-links /wheels $extra -r /tmp/requirements.txt; \
    fi; \
    # Test programs, C++ headers and CMake files that ship inside the torch wheel: ~190 MB never used here.
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    rm -rf "$site"/torch/test "$site"/torch/include "$site"/torch/share/cmake \
           "$site"/torch/bin/test_* "$site"/torch/bin/*Test "$site"/torch/lib/lib*_test.so \
           "$site"/torch/lib/libaoti_custom_ops.so "$site"/torch/lib/libbackend_with_compiler.so
COPY --from=src / /src/
# Non-editable install (setuptools came with the dependencies). The checkpoints are readable by the (non-root) server but owned by root.
RUN set -eu; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore; \
    /opt/venv/bin/pip install -q --no-index --no-deps --no-build-isolation /src; \
    /opt/venv/bin/pip uninstall -q -y pip setuptools; \
    mkdir -p /app/checkpoints; \
    cp -r /src/checkpoints/calculator /src/checkpoints/pronouns /app/checkpoints/; \
    chmod -R a+rX,go-w /app

FROM ${PYTHON_IMAGE}
# Metadata first and the large copies last: with vfs every step copies the whole file system so far.
# (chmod: a base image whose / is not world-readable, as a rootfs tarball from `mktemp -d` is, would
# lock the non-root user out of everything.)
RUN groupadd --system --gid 10001 attnserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin attnserve \
    && chmod 755 /
# ATTNSERVE_CHECKPOINT is explicit: the package is installed into site-packages, where the default
# (checkpoints/ next to the source tree) does not exist. It names the directory of the baked-in
# checkpoints, so every one is served (calculator, the default, and pronouns). Mount another
# checkpoint (e.g. at /models) and point ATTNSERVE_CHECKPOINT at it to serve it instead. The metrics dir holds prometheus_client's
# per-process files (multi-process mode); the server clears stale ones at start.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ATTNSERVE_HOST=0.0.0.0 \
    ATTNSERVE_PORT=8000 \
    ATTNSERVE_CHECKPOINT=/app/checkpoints \
    ATTNSERVE_METRICS_DIR=/tmp/attnserve-metrics
EXPOSE 8000
# SIGINT is LitServe's own clean shutdown (workers and API servers included). The server handles
# SIGTERM the same way (Kubernetes sends SIGTERM whatever the image says).
STOPSIGNAL SIGINT
# /health is 200 "ok" once every worker has loaded the model, 503 before; it never needs the API key.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATTNSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["attnserve"]
USER 10001:10001
COPY --from=build /app /app
COPY --from=build /opt/venv /opt/venv
