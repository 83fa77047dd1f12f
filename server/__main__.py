"""`python -m server` (or `attnserve`): serve a checkpoint over HTTP.

    python -m server                                   # the shipped calculator on 127.0.0.1:8000
    python -m server --checkpoint path/to/llama --port 9000 --max-batch 32 --api-key secret
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from server.settings import parse_args


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    if settings.metrics_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics_dir)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from server.app import build_server  # after PROMETHEUS_MULTIPROC_DIR is settled

    server = build_server(settings)
    # LitServe handles Ctrl+C (KeyboardInterrupt) but not SIGTERM, which would orphan its workers
    # and keep the port bound. Route SIGTERM into its shutdown; restore SIGINT in case this process
    # was started from a non-interactive shell with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: server.request_shutdown())
    server.uvicorn_graceful_timeout = 3
    server.run(host=settings.host, port=settings.port, num_api_servers=settings.api_servers or settings.workers,
               log_level=settings.log_level, generate_client_file=False)
    sys.exit(0)


if __name__ == "__main__":
    main()
