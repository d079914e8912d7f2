"""`python -m server [--host H] [--port P] [--data-dir D] [--demo]`: flags over environment over defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.app import serve
from server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the NeuroLens job server.")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, or NEUROLENS_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000, or NEUROLENS_PORT)")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./neurolens-data, or NEUROLENS_DATA_DIR)")
    parser.add_argument("--token", help="bearer token for mutating requests (or NEUROLENS_TOKEN); required off loopback")
    parser.add_argument("--demo", action="store_true", default=None,
                        help="queue the demo pipeline on first start (an empty database)")
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    settings = Settings(**overrides)
    try:
        settings.check_exposure()
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    serve(settings)


if __name__ == "__main__":
    main()
