"""`python -m server [--host H] [--port P] [--data-dir D] [--token-file F] [--demo]`: flags over environment over defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from server.app import serve
from server.executors import make_executor
from server.settings import Settings, describe_settings_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the NeuroLens job server.")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, or NEUROLENS_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000, or NEUROLENS_PORT)")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./neurolens-data, or NEUROLENS_DATA_DIR)")
    parser.add_argument("--token", help="bearer token every /api request needs; required off loopback. It shows in "
                                        "`ps`: prefer --token-file or NEUROLENS_TOKEN")
    parser.add_argument("--token-file", type=Path, help="file whose first line is the token (or NEUROLENS_TOKEN_FILE)")
    parser.add_argument("--demo", action="store_true", default=None,
                        help="queue the demo pipeline on first start (an empty database)")
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
        settings.check_exposure()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        make_executor(settings).check()  # e.g. Slurm: is the data folder shared with the nodes?
    except ValidationError as exc:
        parser.exit(2, f"error: {describe_settings_error(exc)}\n")
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    serve(settings)


if __name__ == "__main__":
    main()
