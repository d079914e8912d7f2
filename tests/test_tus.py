"""tus 1.0 uploads (server/api/tus.py) against a real server: a stock client (tuspy) killed
mid-upload and resumed, and every bad header answered with tus's status and a sentence.

Every refused request is checked to leave the store as it was: same artifacts, same files.
"""

from __future__ import annotations

import base64
import hashlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, start_server

tusclient = pytest.importorskip("tusclient", reason="tuspy is not installed (pip install -e '.[test]')")
from tusclient.client import TusClient  # noqa: E402

TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}
# Small enough for a quick test, large enough that a store-wide limit below it is reachable.
MAX_UPLOAD_BYTES = 4_000_000


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny encoder file (about 290 KB), written by the trainer's own export code."""
    from trainer.config import EncoderConfig
    from trainer.export import save_encoder
    from trainer.models.multiview import MultiViewEncoder

    return save_encoder(MultiViewEncoder(EncoderConfig.from_name("tiny")),
                        tmp_path_factory.mktemp("files") / "encoder.safetensors")


@pytest.fixture(scope="module")
def tus_server(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("tus") / "data",
                          env={"NEUROLENS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES)})
    yield server
    server.stop()


def metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in values.items())


def checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def store_snapshot(server: RunningServer) -> tuple[list[int], list[str]]:
    with server.client() as client:
        ids = [a["id"] for a in client.get("/api/artifacts").json()["data"]]
    root = server.data_dir / "artifacts"
    return ids, sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# Runs in its own process so that it can be killed like a real client: creates the upload,
# prints its URL, then sends 16 KiB chunks with a pause between them.
TUSPY_UPLOADER = textwrap.dedent("""
    import sys, time
    from tusclient.client import TusClient
    url, path, digest = sys.argv[1:4]
    uploader = TusClient(url).uploader(path, chunk_size=16384, upload_checksum=True,
                                       metadata={"kind": "encoder", "sha256": digest, "filename": "tus-encoder.safetensors"})
    uploader.set_url(uploader.create_url())
    print(uploader.url, flush=True)
    while uploader.offset < uploader.get_file_size():
        uploader.upload_chunk()
        time.sleep(0.1)
""")


def test_tuspy_upload_killed_mid_way_resumes_and_registers_a_verified_artifact(
        tus_server: RunningServer, encoder_file: Path) -> None:
    data = encoder_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    endpoint = f"{tus_server.url}/api/tus"
    process = subprocess.Popen([sys.executable, "-c", TUSPY_UPLOADER, endpoint, str(encoder_file), digest],
                               stdout=subprocess.PIPE, text=True)
    try:
        upload_url = process.stdout.readline().strip()
        assert upload_url.startswith(endpoint + "/"), upload_url
        deadline = time.monotonic() + 60
        offset = 0
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline and offset < len(data) // 4:
                offset = int(client.head(upload_url, headers=TUS).headers["upload-offset"])
                time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    with httpx.Client(timeout=10) as client:
        held = int(client.head(upload_url, headers=TUS).headers["upload-offset"])
        assert len(data) // 4 <= held < len(data), held
        assert not client.get(f"{tus_server.url}/api/artifacts", params={"sha256": digest}).json()["data"]
        # The session is one of ours: the JSON API lists it too.
        sessions = client.get(f"{tus_server.url}/api/artifacts/uploads", params={"sha256": digest}).json()["data"]
        assert [s["offset"] for s in sessions] == [held]

    # A fresh tuspy uploader given the URL asks the server (HEAD) where to go on, and finishes.
    uploader = TusClient(endpoint).uploader(str(encoder_file), url=upload_url, chunk_size=65536, upload_checksum=True)
    assert uploader.offset == held
    uploader.upload()
    artifact_id = int(uploader.request.response_headers["neurolens-artifact-id"])

    with httpx.Client(base_url=tus_server.url, timeout=30) as client:
        artifact = client.get(f"/api/artifacts/{artifact_id}").json()
        assert (artifact["kind"], artifact["sha256"], artifact["size_bytes"], artifact["job_id"]) == \
            ("encoder", digest, len(data), None)
        assert artifact["filename"] == "tus-encoder.safetensors"
        assert client.get(f"/api/artifacts/{artifact_id}/download").content == data
        assert client.head(upload_url, headers=TUS).status_code == 404  # finished: the session is gone
        assert not client.get("/api/artifacts/uploads", params={"sha256": digest}).json()["data"]


def test_every_bad_tus_request_gets_its_status_and_a_sentence(tus_server: RunningServer, encoder_file: Path) -> None:
    data = encoder_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    good = {**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata(kind="encoder", sha256=digest)}
    before = store_snapshot(tus_server)
    with httpx.Client(base_url=tus_server.url, timeout=60) as client:
        options = client.options("/api/tus")
        assert options.status_code == 204
        assert options.headers["tus-version"] == "1.0.0"
        assert set(options.headers["tus-extension"].split(",")) == {"creation", "checksum", "termination"}
        assert options.headers["tus-max-size"] == str(MAX_UPLOAD_BYTES)
        assert "sha256" in options.headers["tus-checksum-algorithm"].split(",")

        def refused(response: httpx.Response, status: int, words: str) -> None:
            assert response.status_code == status, (status, response.status_code, response.text)
            assert words in response.json()["detail"], (words, response.json())
            assert response.headers.get("tus-resumable") == "1.0.0" or status == 415

        creations = [
            ({k: v for k, v in good.items() if k != "Tus-Resumable"}, 412, "no Tus-Resumable header"),
            ({**good, "Tus-Resumable": "0.2.2"}, 412, "'Tus-Resumable: 0.2.2'"),
            ({k: v for k, v in good.items() if k != "Upload-Length"}, 400, "Upload-Length is required"),
            ({**good, "Upload-Length": "-5"}, 400, "Invalid upload-length '-5'"),
            ({**good, "Upload-Length": str(MAX_UPLOAD_BYTES + 1)}, 413, "exceeds this server's limit"),
            ({**good, "Upload-Metadata": metadata(kind="encoder")}, 400, "lacks sha256"),
            ({**good, "Upload-Metadata": "kind !!!,sha256 x"}, 400, "not base64"),
            ({**good, "Upload-Metadata": metadata(kind="weights", sha256=digest)}, 422, "Invalid kind 'weights'"),
            ({**good, "Upload-Metadata": metadata(kind="encoder", sha256="abc")}, 422, "Invalid sha256 'abc'"),
            ({**good, "Upload-Metadata": metadata(kind="encoder", sha256=digest, filename=".x")}, 422,
             "Invalid filename '.x'"),
        ]
        for headers, status, words in creations:
            response = client.post("/api/tus", headers=headers)
            refused(response, status, words)
        assert client.post("/api/tus", headers=creations[0][0]).headers["tus-version"] == "1.0.0"
        assert store_snapshot(tus_server) == before

        created = client.post("/api/tus", headers=good)
        assert created.status_code == 201 and created.headers["tus-resumable"] == "1.0.0"
        url = created.headers["location"]
        head = client.head(url, headers=TUS)
        assert (head.status_code, head.headers["upload-offset"], head.headers["upload-length"],
                head.headers["cache-control"]) == (200, "0", str(len(data)), "no-store")

        first = data[:half]
        patches = [
            ({**PATCH, "Upload-Offset": "0", "Content-Type": "application/octet-stream"}, first, 415,
             "application/offset+octet-stream"),
            ({k: v for k, v in PATCH.items() if k != "Tus-Resumable"} | {"Upload-Offset": "0"}, first, 412,
             "no Tus-Resumable header"),
            (PATCH, first, 400, "Upload-Offset is required"),
            ({**PATCH, "Upload-Offset": "7"}, first, 409, "Continue from Upload-Offset: 0"),
            ({**PATCH, "Upload-Offset": "0", "Upload-Checksum": checksum("sha256", first[:-1])}, first, 460,
             "Upload-Checksum mismatch"),
            ({**PATCH, "Upload-Offset": "0", "Upload-Checksum": checksum("md5", first)}, first, 400,
             "use one of sha256, sha1"),
            ({**PATCH, "Upload-Offset": "0", "Upload-Checksum": "sha256 short"}, first, 400, "not a base64 sha256"),
            ({**PATCH, "Upload-Offset": "0"}, data + b"more", 413, "would go past it"),
        ]
        for headers, body, status, words in patches:
            refused(client.patch(url, headers=headers, content=body), status, words)
            assert client.head(url, headers=TUS).headers["upload-offset"] == "0", words
        # A browser page of another site may not send bytes, whatever the protocol.
        cross = client.patch(url, headers={**PATCH, "Upload-Offset": "0", "Sec-Fetch-Site": "cross-site"}, content=first)
        assert cross.status_code == 403

        accepted = client.patch(url, headers={**PATCH, "Upload-Offset": "0",
                                              "Upload-Checksum": checksum("sha256", first)}, content=first)
        assert accepted.status_code == 204 and accepted.headers["upload-offset"] == str(half)
        refused(client.patch(url, headers={**PATCH, "Upload-Offset": "0"}, content=first), 409,
                f"Continue from Upload-Offset: {half}")
        # Termination: the half-sent upload and its bytes go.
        deleted = client.delete(url, headers=TUS)
        assert deleted.status_code == 204 and deleted.headers["tus-resumable"] == "1.0.0"
        assert client.head(url, headers=TUS).status_code == 404
        refused(client.patch(url, headers={**PATCH, "Upload-Offset": str(half)}, content=data[half:]), 404,
                "not found")
        assert store_snapshot(tus_server) == before

        # The whole file arrives but is not the one declared: 422 at the last PATCH, nothing stored.
        lying = client.post("/api/tus", headers={**good, "Upload-Metadata": metadata(
            kind="encoder", sha256=hashlib.sha256(b"another file").hexdigest())})
        assert lying.status_code == 201
        refused(client.patch(lying.headers["location"], headers={**PATCH, "Upload-Offset": "0"}, content=data),
                422, "sha256 mismatch")
        assert client.head(lying.headers["location"], headers=TUS).status_code == 404
        assert store_snapshot(tus_server) == before


def test_tus_needs_the_token_like_every_api_route(tmp_path: Path, encoder_file: Path) -> None:
    server = start_server(tmp_path / "data", args=("--token", "s3cret"))
    try:
        data = encoder_file.read_bytes()
        headers = {**TUS, "Upload-Length": str(len(data)),
                   "Upload-Metadata": metadata(kind="encoder", sha256=hashlib.sha256(data).hexdigest())}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.post("/api/tus", headers=headers).status_code == 401
        uploader = TusClient(f"{server.url}/api/tus", headers={"Authorization": "Bearer s3cret"}).uploader(
            str(encoder_file), metadata={"kind": "encoder", "sha256": hashlib.sha256(data).hexdigest()})
        uploader.upload()
        assert uploader.request.response_headers["neurolens-artifact-id"]
    finally:
        server.stop()
