"""docker-compose.yml and the Dockerfile agree with the settings and the CLI they run."""

from __future__ import annotations

import os
import re
import tomllib

import pytest
import yaml
from typer.testing import CliRunner

from clients.cli import app
from server.settings import Settings
from tests.conftest import REPO_ROOT


@pytest.fixture
def compose() -> dict:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert list(compose["services"]) == ["neurolens", "postgres"]
    return compose


@pytest.fixture
def service(compose: dict) -> dict:
    return compose["services"]["neurolens"]


@pytest.fixture
def default_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    # The defaults, not whatever NEUROLENS_* the developer's shell exports.
    for name in [n for n in os.environ if n.startswith("NEUROLENS_")]:
        monkeypatch.delenv(name)
    return Settings()


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_ports_match_settings(service: dict, default_settings: Settings) -> None:
    command = service["command"]
    assert command[:2] == ["neurolens", "serve"]
    assert int(option(command, "--port")) == default_settings.port
    assert option(command, "--host") == "0.0.0.0"  # reachable from outside the container
    published = [str(p) for p in service["ports"]]
    assert published == [f"{default_settings.port}:{default_settings.port}"]
    healthcheck = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{default_settings.port}/api/health" in healthcheck
    assert "curl" not in healthcheck  # python:3.11-slim has none


def test_data_dir_is_the_volume(service: dict) -> None:
    data_dir = service["environment"]["NEUROLENS_DATA_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert data_dir in mounts
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert mounts[data_dir] in compose["volumes"], "the data dir must be on a named volume"


def test_serve_command_is_a_real_subcommand(service: dict) -> None:
    # Parsing the compose command's own flags (then --help) fails with exit 2 on any unknown flag.
    result = CliRunner().invoke(app, [*service["command"][1:], "--help"])
    assert result.exit_code == 0, result.output
    for flag in ("--host", "--port", "--data-dir", "--demo"):
        assert flag in result.output


def test_dockerfile_pins_the_same_torch_as_the_project() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert re.search(rf"pip install [^\n]*download\.pytorch\.org/whl/cpu[^\n]*{re.escape(torch_pin)}", dockerfile)
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile


def test_postgres_is_a_profile_the_server_can_use(compose: dict) -> None:
    """`docker compose up` alone runs SQLite; `--profile postgres` adds PostgreSQL 15 on a volume
    of its own, and the URL the README and the compose file give reaches it."""
    from sqlalchemy.engine import make_url

    postgres, server = compose["services"]["postgres"], compose["services"]["neurolens"]
    assert postgres["profiles"] == ["postgres"] and "profiles" not in server
    assert postgres["image"] == "postgres:15"
    assert server["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}
    assert server["environment"]["NEUROLENS_DATABASE_URL"] == "${NEUROLENS_DATABASE_URL:-}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in postgres["volumes"]}
    assert mounts["/var/lib/postgresql/data"] in compose["volumes"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    env = postgres["environment"]
    password = re.fullmatch(r"\$\{POSTGRES_PASSWORD:-(.+)\}", env["POSTGRES_PASSWORD"]).group(1)
    for text in ((REPO_ROOT / "docker-compose.yml").read_text(), (REPO_ROOT / "README.md").read_text()):
        found = re.search(r"NEUROLENS_DATABASE_URL=(postgresql\+psycopg://\S+@postgres:\S+)", text)
        assert found, "no NEUROLENS_DATABASE_URL for the compose service"
        url = make_url(found.group(1))
        assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
            "postgresql+psycopg", env["POSTGRES_USER"], password, "postgres", 5432, env["POSTGRES_DB"])
