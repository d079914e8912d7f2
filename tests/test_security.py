"""Access and request limits against a live server: tokens, exposure, oversized bodies."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO_ROOT, free_port, start_server

TOKEN = "s3cret-token-for-tests"


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Refusing to listen on '0.0.0.0' without a token" in result.stderr
    assert not (tmp_path / "neurolens.db").exists()


def test_with_a_token_every_api_request_needs_it(tmp_path):
    server = start_server(tmp_path / "data", args=("--token", TOKEN))
    try:
        with server.client(authenticated=False) as anonymous, server.client() as client:
            body = {"stage": "stage1", "config": {"preset": "tiny", "steps": 100000, "log_every_s": 0.5}}
            response = anonymous.post("/api/jobs", json=body)
            assert response.status_code == 401
            assert "Authorization: Bearer" in response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = anonymous.post("/api/jobs", json=body, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert client.get("/api/jobs").json()["count"] == 0  # nothing was created

            job = client.post("/api/jobs", json=body).json()
            report = b'{"note": "imported"}'
            artifact = client.post("/api/artifacts", params={"kind": "report", "sha256": hashlib.sha256(report).hexdigest()},
                                   content=report, headers={"Content-Type": "application/octet-stream"})
            assert artifact.status_code == 201, artifact.text
            # Reads need the token too (finding 6): every /api GET but /api/health.
            reads = ["/api/jobs", f"/api/jobs/{job['id']}", f"/api/jobs/{job['id']}/events",
                     f"/api/jobs/{job['id']}/logs", "/api/artifacts", f"/api/artifacts/{artifact.json()['id']}",
                     f"/api/artifacts/{artifact.json()['id']}/download", "/api/artifacts/uploads", "/api/system",
                     "/api/presets"]
            for path in reads:
                refused = anonymous.get(path)
                assert refused.status_code == 401, (path, refused.text)
                assert "every /api request but /api/health" in refused.json()["detail"]
                assert anonymous.head(path).status_code == 401
                assert client.get(path).status_code == 200, path
            assert anonymous.get("/api/health").status_code == 200
            assert anonymous.get("/").status_code == 200 and anonymous.get("/app.js").status_code == 200
            assert anonymous.post(f"/api/jobs/{job['id']}/cancel").status_code == 401
            # The trainer reports with its own per-job token, not the server's: it gets to run.
            server.wait_for_job(job["id"], {"running"})
            assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
            server.wait_for_job(job["id"], {"cancelled"}, timeout=60)
    finally:
        server.stop()


def test_the_cli_sends_the_token_and_says_when_it_is_missing(tmp_path):
    from typer.testing import CliRunner

    from clients.cli import app

    server = start_server(tmp_path / "data", args=("--token", TOKEN))
    runner = CliRunner()
    try:
        refused = runner.invoke(app, ["--server", server.url, "submit", "stage1", "--steps", "3"], env={"NEUROLENS_TOKEN": ""})
        assert refused.exit_code == 1
        assert "Authorization: Bearer" in refused.output and "Traceback" not in refused.output
        accepted = runner.invoke(app, ["--server", server.url, "--token", TOKEN, "submit", "stage1", "--steps", "3", "-q"])
        assert accepted.exit_code == 0, accepted.output
        job_id = int(accepted.output.strip())
        from_env = runner.invoke(app, ["--server", server.url, "cancel", str(job_id)], env={"NEUROLENS_TOKEN": TOKEN})
        assert from_env.exit_code in (0, 1), from_env.output  # cancelled, or already finished (409)
        assert "Authorization" not in from_env.output
    finally:
        server.stop()


def test_serve_refuses_all_interfaces_without_a_token(tmp_path):
    from typer.testing import CliRunner

    from clients.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)], env={"NEUROLENS_TOKEN": ""})
    assert result.exit_code == 2
    assert "Refusing to listen on '0.0.0.0' without a token" in result.output


def test_server_with_a_token_may_listen_on_all_interfaces(tmp_path):
    (tmp_path / "datasets").mkdir()
    server = start_server(tmp_path / "data", env={"NEUROLENS_DATASET_ROOTS": str(tmp_path / "datasets")},
                          args=("--token", TOKEN, "--host", "0.0.0.0"))  # a later flag wins
    server.stop()  # start_server already checked /api/health over loopback


def test_oversized_bodies_are_refused_early(shared_server):
    huge = b'{"stage": "stage1", "dataset": "' + b"x" * (2 * 1024**2) + b'"}'
    with shared_server.client() as client:
        response = client.post("/api/jobs", content=huge, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert "larger than the limit of 1048576 bytes" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for start in range(0, len(huge), 65536):
                yield huge[start:start + 65536]

        response = client.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert client.get("/api/jobs").json()["count"] == 0
        assert client.get("/api/health").status_code == 200


def test_malformed_bodies_are_422_not_500(shared_server):
    with shared_server.client() as client:
        for content in (b"{not json", b"[]", b'"stage1"', b'{"stage": 1, "config": []}'):
            response = client.post("/api/jobs", content=content, headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (content, response.text)
        response = client.post("/api/jobs", json={"stage": "stage1", "config": {"steps": 10 ** 30}})
        assert response.status_code == 422, response.text
        assert isinstance(httpx.get(f"{shared_server.url}/api/jobs/abc").status_code, int)
        assert httpx.get(f"{shared_server.url}/api/jobs/abc").status_code == 422


def test_non_finite_numbers_are_refused(shared_server):
    with shared_server.client() as client:
        for raw in (b'{"stage": "stage1", "config": {"lr": NaN}}', b'{"stage": "stage1", "config": {"lr": Infinity}}'):
            response = client.post("/api/jobs", content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 422, response.text
            assert "Invalid lr" in response.json()["detail"]


def test_a_trainer_token_reports_for_its_own_job_only(tmp_path):
    server = start_server(tmp_path / "data", env={"NEUROLENS_CONCURRENCY": "2"})
    try:
        with server.client() as client:
            body = {"stage": "stage1", "config": {"preset": "tiny", "steps": 100000, "log_every_s": 0.5}}
            first, second = (client.post("/api/jobs", json=body).json() for _ in range(2))
            for job in (first, second):
                server.wait_for_job(job["id"], {"running"})
            spec = server.data_dir / "jobs" / str(first["id"]) / "spec.json"
            token = json.loads(spec.read_text())["token"]
            own = client.post(f"/api/jobs/{first['id']}/events", json={"kind": "log", "message": "hello"},
                              headers={"Authorization": f"Bearer {token}"})
            assert own.status_code == 200
            other = client.post(f"/api/jobs/{second['id']}/events", json={"kind": "log", "message": "forged"},
                                headers={"Authorization": f"Bearer {token}"})
            assert other.status_code == 401
            assert f"may not report for job {second['id']}" in other.json()["detail"]
            for job in (first, second):
                client.post(f"/api/jobs/{job['id']}/cancel")
            for job in (first, second):
                server.wait_for_job(job["id"], {"cancelled"}, timeout=60)
    finally:
        server.stop()


def test_bodies_of_the_wrong_type_are_refused_with_415(shared_server):
    with shared_server.client() as client:
        job = {"stage": "stage1", "config": {"preset": "tiny", "steps": 3}}
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            refused = client.post("/api/jobs", content=json.dumps(job), headers={"Content-Type": content_type})
            assert refused.status_code == 415, refused.text
            assert "takes 'Content-Type: application/json'" in refused.json()["detail"]
        # A body without a type from a page (a no-cors fetch of a Blob; browsers send Origin with
        # it) is refused; the same from a program, which sends no Origin, is not a web page.
        untyped = client.post("/api/jobs", content=json.dumps(job).encode(),
                              headers={"Origin": shared_server.url})
        assert untyped.status_code == 415 and "none was given" in untyped.json()["detail"]
        upload = client.post("/api/artifacts", params={"kind": "report", "sha256": "0" * 64}, content=b"{}",
                             headers={"Content-Type": "text/plain"})
        assert upload.status_code == 415
        assert "application/octet-stream" in upload.json()["detail"] and "curl" in upload.json()["detail"]
        assert client.get("/api/jobs").json()["count"] == 0 and client.get("/api/artifacts").json()["count"] == 0
        # A bodiless action (cancel) needs no type, and JSON with its charset is JSON.
        typed = client.post("/api/jobs", content=json.dumps(job), headers={"Content-Type": "application/json; charset=utf-8"})
        assert typed.status_code == 201, typed.text
        assert client.post(f"/api/jobs/{typed.json()['id']}/cancel").status_code == 200


def test_browser_marked_cross_site_changes_are_refused_with_403(shared_server):
    with shared_server.client() as client:
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "http://127.0.0.1:1"}, {"Origin": "null"}, {"Origin": "http://evil.example"}):
            refused = client.post("/api/jobs", json={"stage": "stage1"}, headers=headers)
            assert refused.status_code == 403, (headers, refused.text)
            assert "Refused a POST /api/jobs" in refused.json()["detail"]
        assert client.get("/api/jobs", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        # The dashboard's own requests: same origin, and a typed-in address.
        own = {"Origin": shared_server.url, "Sec-Fetch-Site": "same-origin"}
        assert client.get("/api/jobs", headers=own).status_code == 200
        assert client.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # a link to the dashboard
        created = client.post("/api/jobs", json={"stage": "stage1", "config": {"preset": "tiny", "steps": 3}}, headers=own)
        assert created.status_code == 201, created.text


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads other processes' command lines from /proc")
def test_a_token_from_the_environment_shows_in_no_command_line_nor_a_trainer(tmp_path):
    server = start_server(tmp_path / "data", env={"NEUROLENS_TOKEN": TOKEN})
    try:
        with server.client(authenticated=False) as anonymous:
            assert anonymous.get("/api/jobs").status_code == 401
        with server.client() as client:
            job = client.post("/api/jobs", json={"stage": "stage1", "config": {"preset": "tiny", "steps": 100000}}).json()
            server.wait_for_job(job["id"], {"running"})
            trainers = psutil.Process(server.process.pid).children(recursive=True)
            assert trainers
            for process in [psutil.Process(server.process.pid), *trainers]:
                assert TOKEN not in " ".join(process.cmdline()), process.cmdline()
            for trainer in trainers:  # the server's token is the server's: a trainer uses its job's
                assert TOKEN not in "".join(f"{k}={v}" for k, v in trainer.environ().items())
    finally:  # stopping the server stops its trainer

        server.stop()


def test_a_token_file_is_read_and_its_problems_are_named_without_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = start_server(tmp_path / "data", env={"NEUROLENS_TOKEN_FILE": str(token_file)})
    server.token = TOKEN
    try:
        with server.client(authenticated=False) as anonymous, server.client() as client:
            assert anonymous.get("/api/jobs").status_code == 401
            assert client.get("/api/jobs").status_code == 200
        assert TOKEN not in " ".join(psutil.Process(server.process.pid).cmdline())
    finally:
        server.stop()
    from pydantic import ValidationError

    from server.settings import Settings, describe_settings_error

    empty = tmp_path / "empty"
    empty.write_text("\n")
    for given, message in (({"token_file": tmp_path / "missing"}, "Cannot read the token file"),
                           ({"token_file": empty}, "is empty; put the token on its first line"),
                           ({"token_file": token_file, "token": "another"}, "they differ")):
        with pytest.raises(ValidationError) as refused:
            Settings(**given)
        assert message in describe_settings_error(refused.value)
        assert TOKEN not in describe_settings_error(refused.value)
    result = subprocess.run([sys.executable, "-m", "server", "--token-file", str(token_file), "--token", "another"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "they differ" in result.stderr and TOKEN not in result.stderr


def test_a_trainer_registers_only_files_under_its_checkpoints_and_final_folders(tmp_path):
    server = start_server(tmp_path / "data", args=("--token", TOKEN))
    try:
        with server.client() as client:
            job = client.post("/api/jobs", json={"stage": "stage1", "config": {"preset": "tiny", "steps": 100000}}).json()
            server.wait_for_job(job["id"], {"running"})
            job_dir = server.data_dir / "jobs" / str(job["id"])
            trainer = {"Authorization": f"Bearer {json.loads((job_dir / 'spec.json').read_text())['token']}"}
            (job_dir / "checkpoints").mkdir(exist_ok=True)
            (job_dir / "checkpoints" / "innocent.json").symlink_to(job_dir / "spec.json")
            (job_dir / "notes.json").write_text("{}")
            for path in ("spec.json", "trainer.log", "notes.json", "checkpoints/innocent.json", "final/../spec.json",
                         "checkpoints"):
                refused = client.post(f"/api/jobs/{job['id']}/artifacts/register", json={"kind": "report", "path": path},
                                      headers=trainer)
                assert refused.status_code == 422, (path, refused.text)
                assert "only files under checkpoints/ or final/" in refused.json()["detail"], refused.text
            assert client.get("/api/artifacts").json()["count"] == 0
            # What a trainer writes in final/ is registered as before.
            (job_dir / "final").mkdir(exist_ok=True)
            (job_dir / "final" / "report.json").write_text('{"score": 1}')
            accepted = client.post(f"/api/jobs/{job['id']}/artifacts/register",
                                   json={"kind": "report", "path": "final/report.json"}, headers=trainer)
            assert accepted.status_code == 201, accepted.text
    finally:
        server.stop()


def test_allowed_hosts_and_a_wildcard_bind_widen_the_host_check_and_nothing_else(tmp_path):
    # A flag, not NEUROLENS_HOST: start_server passes --host 127.0.0.1, and a later flag wins.
    (tmp_path / "datasets").mkdir()
    server = start_server(tmp_path / "data", args=("--token", TOKEN, "--host", "0.0.0.0"),
                          env={"NEUROLENS_ALLOWED_HOSTS": "gpu-box, Lab.Example.org",
                               "NEUROLENS_DATASET_ROOTS": str(tmp_path / "datasets")})
    try:
        with server.client() as client:
            for host in ("gpu-box:8000", "lab.example.org", "192.168.1.5:8000", "[fe80::1]"):
                assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
            for host in ("gpu-box.attacker.example", "example.org", "localhost:1@attacker.example"):
                refused = client.get("/api/health", headers={"Host": host})
                assert refused.status_code == 421, host
                assert all(word in refused.json()["detail"] for word in ("gpu-box", "lab.example.org", "any IP address"))
    finally:
        server.stop()
