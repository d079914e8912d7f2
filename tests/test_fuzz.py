"""Schemathesis fuzzes every operation in the live server's OpenAPI schema: no 5xx, no crash."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def schemathesis_command() -> list[str]:
    executable = Path(sys.executable).with_name("schemathesis")
    return [str(executable)] if executable.exists() else [shutil.which("schemathesis") or "schemathesis"]


def test_fuzzing_the_openapi_schema_finds_no_server_errors(server, tmp_path):
    result = subprocess.run(
        [*schemathesis_command(), "run", f"{server.url}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--workers", "2",
         "--phases", "coverage,fuzzing,stateful", "--seed", "7"],
        capture_output=True, text=True, timeout=600,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Tested: 16" in output or "Tested:" in output
    assert server.process.poll() is None, "the server died under fuzzing"
    assert "Traceback" not in server.log(), server.log()[-4000:]
