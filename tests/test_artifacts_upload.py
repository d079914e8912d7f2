"""Downloads with Range / ETag / digest, and uploads (one-shot and resumable) against a real server.

Every refused upload is checked to leave the store exactly as it was: same artifact list, same
files on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from clients import NeuroLensClient
from clients.cli import app
from tests.conftest import RunningServer, start_server

runner = CliRunner()


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny encoder file, written by the trainer's own export code."""
    from trainer.config import EncoderConfig
    from trainer.export import save_encoder
    from trainer.models.multiview import MultiViewEncoder

    return save_encoder(MultiViewEncoder(EncoderConfig.from_name("tiny")),
                        tmp_path_factory.mktemp("files") / "encoder.safetensors")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_snapshot(server: RunningServer) -> tuple[list[int], list[str]]:
    """Artifact ids on record and every file under the artifact store (uploads included)."""
    with server.client() as client:
        ids = [a["id"] for a in client.get("/api/artifacts").json()["data"]]
    root = server.data_dir / "artifacts"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return ids, files


def upload(client: httpx.Client, data: bytes, kind: str, digest: str, **params: str) -> httpx.Response:
    return client.post("/api/artifacts", params={"kind": kind, "sha256": digest, **params}, content=data)


def test_upload_then_download_with_ranges_etag_and_digest(shared_server: RunningServer, encoder_file: Path) -> None:
    data = encoder_file.read_bytes()
    with shared_server.client() as client:
        response = upload(client, data, "encoder", sha256(data), filename="imported-encoder.safetensors")
        assert response.status_code == 201, response.text
        artifact = response.json()
        assert artifact["job_id"] is None and artifact["kind"] == "encoder"
        assert artifact["size_bytes"] == len(data) and artifact["sha256"] == sha256(data)
        assert artifact["filename"] == "imported-encoder.safetensors"
        url = f"/api/artifacts/{artifact['id']}/download"

        whole = client.get(url)
        assert whole.status_code == 200 and whole.content == data
        etag = f'"{sha256(data)}"'
        assert whole.headers["etag"] == etag
        assert whole.headers["accept-ranges"] == "bytes"
        assert int(whole.headers["content-length"]) == len(data)
        assert whole.headers["x-checksum-sha256"] == sha256(data)
        assert whole.headers["repr-digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"

        head = client.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data) and not head.content

        part = client.get(url, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        tail = client.get(url, headers={"Range": f"bytes={len(data) - 10}-", "If-Range": etag})
        assert tail.status_code == 206 and tail.content == data[-10:]
        # A stale validator means the client's partial file is of another version: send it all.
        stale = client.get(url, headers={"Range": "bytes=10-", "If-Range": '"0000"'})
        assert stale.status_code == 200 and stale.content == data
        beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{len(data)}"
        assert f"the file has {len(data)} bytes" in beyond.json()["detail"]
        malformed = client.get(url, headers={"Range": "lines=1-2"})
        assert malformed.status_code == 400 and "Malformed Range header" in malformed.json()["detail"]


def test_bad_uploads_are_refused_with_the_reason_and_change_nothing(
        shared_server: RunningServer, encoder_file: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from trainer.config import EncoderConfig
    from trainer.models.multiview import MultiViewEncoder

    data = encoder_file.read_bytes()
    # An encoder whose declared config (d_model 128) does not build the tensors it carries.
    encoder = MultiViewEncoder(EncoderConfig.from_name("tiny"))
    lying_config = {**encoder.config.to_dict(), "d_model": 128, "d_ff": 256}
    lying = tmp_path / "lying.safetensors"
    save_file(encoder.state_dict(), str(lying),
              metadata={"format": "neurolens.encoder/1", "encoder_config": json.dumps(lying_config)})
    # A pickle is never opened: it fails the safetensors header check before anything else.
    pickled = tmp_path / "encoder.pt"
    torch.save(encoder.state_dict(), pickled)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF

    cases = [
        (data, "encoder", "0" * 64, {}, "sha256 mismatch"),
        (bytes(flipped), "encoder", sha256(data), {}, "sha256 mismatch"),
        (data[: len(data) * 2 // 3], "encoder", sha256(data[: len(data) * 2 // 3]), {}, "Truncated safetensors file"),
        (data, "encoder", "not-a-digest", {}, "Invalid sha256 'not-a-digest'"),
        (data, "model", sha256(data), {}, "expected 'neurolens.model/1'"),
        (data, "encoder", sha256(data), {"filename": ".hidden"}, "Invalid filename '.hidden'"),
        (pickled.read_bytes(), "encoder", sha256(pickled.read_bytes()), {}, "Not a safetensors file"),
        (lying.read_bytes(), "encoder", sha256(lying.read_bytes()), {}, "tensors do not match the declared config"),
        (b"{not json", "report", sha256(b"{not json"), {}, "not valid JSON"),
    ]
    before = store_snapshot(shared_server)
    with shared_server.client(timeout=120) as client:
        for body, kind, digest, params, message in cases:
            response = upload(client, body, kind, digest, **params)
            assert response.status_code == 422, (message, response.text)
            assert message in response.json()["detail"], (message, response.json())
        response = upload(client, data, "weights", sha256(data))
        assert response.status_code == 422 and "kind" in response.text
    assert store_snapshot(shared_server) == before


def test_resumable_upload_survives_a_dropped_connection(shared_server: RunningServer, encoder_file: Path) -> None:
    data = encoder_file.read_bytes()
    digest, size = sha256(data), len(data)
    half = size // 2
    before = store_snapshot(shared_server)
    with shared_server.client() as client:
        created = client.post("/api/artifacts/uploads", json={"kind": "encoder", "sha256": digest, "size_bytes": size})
        assert created.status_code == 201, created.text
        upload_id = created.json()["id"]
        assert created.json()["offset"] == 0 and created.json()["created_at"].endswith("Z")
        path = f"/api/artifacts/uploads/{upload_id}"

        response = client.patch(path, content=data[:half], headers={"Upload-Offset": "0"})
        assert response.status_code == 200 and response.json()["offset"] == half
        assert response.headers["upload-offset"] == str(half)
        # A retry of bytes already held is refused with the offset to use instead.
        response = client.patch(path, content=data[:half], headers={"Upload-Offset": "0"})
        assert response.status_code == 409 and f"Upload-Offset: {half}" in response.json()["detail"]
        response = client.post(f"{path}/complete")
        assert response.status_code == 409 and f"has {half} of {size} bytes" in response.json()["detail"]
        # More than the declared size is refused before it is read.
        response = client.patch(path, content=data, headers={"Upload-Offset": str(half)})
        assert response.status_code == 413

        # The connection drops after 20000 more bytes: those are kept, and nothing is visible yet.
        sent = 20000
        with socket.create_connection(("127.0.0.1", int(shared_server.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall((f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpload-Offset: {half}\r\n"
                          f"Content-Length: {size - half}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
                         + data[half:half + sent])
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while (offset := client.get(path).json()["offset"]) != half + sent and time.monotonic() < deadline:
            time.sleep(0.1)
        assert offset == half + sent
        assert client.get("/api/artifacts").json()["count"] == len(before[0])
        listed = client.get("/api/artifacts/uploads", params={"sha256": digest}).json()["data"]
        assert [u["id"] for u in listed] == [upload_id]

        response = client.patch(path, content=data[offset:], headers={"Upload-Offset": str(offset)})
        assert response.status_code == 200 and response.json()["offset"] == size
        response = client.post(f"{path}/complete", timeout=120)
        assert response.status_code == 201, response.text
        artifact = response.json()
        assert artifact["sha256"] == digest and artifact["job_id"] is None
        assert client.get(path).status_code == 404
        assert client.get(f"/api/artifacts/{artifact['id']}/download").content == data

        # An abandoned session can be deleted, and leaves nothing behind.
        other = client.post("/api/artifacts/uploads", json={"kind": "encoder", "sha256": digest, "size_bytes": size})
        other_path = f"/api/artifacts/uploads/{other.json()['id']}"
        client.patch(other_path, content=data[:1000], headers={"Upload-Offset": "0"})
        assert client.delete(other_path).status_code == 204
        assert client.get(other_path).status_code == 404
    ids, files = store_snapshot(shared_server)
    assert files == sorted(before[1] + [f"{artifact['id']}/encoder.safetensors"])


def test_client_and_cli_upload_resume_and_refuse_a_wrong_digest(shared_server: RunningServer,
                                                                encoder_file: Path) -> None:
    data = encoder_file.read_bytes()
    with NeuroLensClient(shared_server.url) as client:
        # An earlier upload got a third of the file across, then its process died.
        session = client.open_upload("encoder", sha256(data), len(data), "resumed.safetensors", reuse=False)
        third = len(data) // 3
        client.send_upload_bytes(session["id"], 0, third, iter([data[:third]]))
        seen: list[int] = []
        artifact = client.upload_artifact(encoder_file, "encoder", filename="resumed.safetensors",
                                          progress=lambda done, total: seen.append(done))
        assert artifact["filename"] == "resumed.safetensors" and artifact["sha256"] == sha256(data)
        assert seen[0] > third and seen[-1] == len(data)  # only the missing two thirds were read and sent
        assert client.list_uploads(sha256=sha256(data)) == []

    before = store_snapshot(shared_server)
    wrong = "ab" * 32
    result = runner.invoke(app, ["--server", shared_server.url, "upload", str(encoder_file), "--sha256", wrong])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sha256 mismatch") and wrong in lines[0], result.stderr
    assert store_snapshot(shared_server) == before

    result = runner.invoke(app, ["--server", shared_server.url, "upload", str(encoder_file), "--kind", "encoder",
                                 "--sha256", sha256(data), "-q"])
    assert result.exit_code == 0, result.output
    new_id = int(result.stdout.strip())
    missing = runner.invoke(app, ["--server", shared_server.url, "upload", "no-such-file.safetensors"])
    assert missing.exit_code == 1 and missing.stderr.strip() == "error: no such file: no-such-file.safetensors"
    bad_kind = runner.invoke(app, ["--server", shared_server.url, "upload", str(encoder_file), "--kind", "weights"])
    assert bad_kind.exit_code == 1 and bad_kind.stderr.startswith("error: ") and "'encoder'" in bad_kind.stderr
    listed = runner.invoke(app, ["--server", shared_server.url, "artifacts", "--kind", "encoder"])
    assert "imported" in listed.stdout and str(new_id) in listed.stdout


def test_upload_limit_and_expiry_of_abandoned_uploads(tmp_path: Path, encoder_file: Path) -> None:
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_UPLOAD_BYTES": "100000",
                                                  "NEUROLENS_UPLOAD_EXPIRY_S": "1"})
    try:
        data = encoder_file.read_bytes()
        assert len(data) > 100000
        with server.client() as client:
            response = upload(client, data, "encoder", sha256(data))
            assert response.status_code == 413
            assert "limit of 100000 bytes" in response.json()["detail"]
            response = client.post("/api/artifacts/uploads", json={"kind": "encoder", "sha256": sha256(data),
                                                                   "size_bytes": len(data)})
            assert response.status_code == 413
            assert client.get("/api/artifacts").json()["count"] == 0
            assert not any(p.is_file() for p in (server.data_dir / "artifacts").rglob("*"))

            # An upload abandoned half-way is deleted once it has been idle for upload_expiry_s.
            small = data[:5000]
            created = client.post("/api/artifacts/uploads", json={"kind": "encoder", "sha256": sha256(small),
                                                                  "size_bytes": len(small)}).json()
            client.patch(f"/api/artifacts/uploads/{created['id']}", content=small[:100], headers={"Upload-Offset": "0"})
            assert client.get("/api/artifacts/uploads").json()["count"] == 1
            time.sleep(1.5)
            assert client.get("/api/artifacts/uploads").json()["count"] == 0
            assert client.get(f"/api/artifacts/uploads/{created['id']}").status_code == 404
            assert not any(p.is_file() for p in (server.data_dir / "artifacts").rglob("*"))
    finally:
        server.stop()


def with_encoder_config(path: Path, encoder_config: object) -> bytes:
    """The encoder file's bytes with its tensors unchanged and another declared ``encoder_config``."""
    from trainer.artifact_format import encode_header, read_header

    header = read_header(path)
    tensors = sorted(header.tensors.items(), key=lambda item: item[1].begin)
    prefix = encode_header([(name, t.dtype, t.shape) for name, t in tensors],
                           {**header.metadata, "encoder_config": json.dumps(encoder_config)})
    return prefix + path.read_bytes()[header.data_offset:]


def declaring(path: Path, **changes: object) -> bytes:
    """The encoder file's bytes, its declared config changed by ``changes``."""
    from trainer.artifact_format import read_header

    return with_encoder_config(path, {**json.loads(read_header(path).metadata["encoder_config"]), **changes})


def test_a_small_file_declaring_a_huge_encoder_is_refused_within_seconds(shared_server: RunningServer,
                                                                         encoder_file: Path) -> None:
    import psutil

    server_process = psutil.Process(shared_server.process.pid)
    before = store_snapshot(shared_server)
    rss_before = server_process.memory_info().rss
    with shared_server.client() as client:
        # Beyond the config bounds; within them, but far more than the file's tensors can hold.
        for changes, message in [({"n_layers": 20000}, "Invalid n_layers 20000; expected a whole number from 1 to 96"),
                                 ({"n_layers": 96, "d_model": 1024, "d_ff": 4096}, "but its tensors hold only")]:
            data = declaring(encoder_file, **changes)
            started = time.monotonic()
            response = upload(client, data, "encoder", sha256(data))
            assert time.monotonic() - started < 2.0, changes  # no validator was started
            assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert server_process.memory_info().rss - rss_before < 50 * 1024**2
    assert store_snapshot(shared_server) == before


def test_two_validations_at_once_run_one_after_the_other(shared_server: RunningServer, encoder_file: Path) -> None:
    import threading

    import psutil

    data = encoder_file.read_bytes()
    server_process = psutil.Process(shared_server.process.pid)
    seen: set[int] = set()
    most_at_once = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_at_once
        while not done.is_set():
            validators = [p.pid for p in server_process.children(recursive=True)
                          if "trainer.validate" in " ".join(_cmdline(p))]
            seen.update(validators)
            most_at_once = max(most_at_once, len(validators))
            time.sleep(0.02)

    def send(name: str, answers: list[int]) -> None:
        with shared_server.client(timeout=300) as client:
            answers.append(upload(client, data, "encoder", sha256(data), filename=name).status_code)

    answers: list[int] = []
    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=send, args=(f"twin-{i}.safetensors", answers)) for i in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    done.set()
    watcher.join()
    assert answers == [201, 201]
    assert len(seen) == 2 and most_at_once == 1, (seen, most_at_once)


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_json_bodies_of_upload_routes_are_held_to_the_request_limit(tmp_path: Path, encoder_file: Path) -> None:
    server = start_server(tmp_path / "data", env={"NEUROLENS_MAX_REQUEST_BYTES": "65536"})
    try:
        data = encoder_file.read_bytes()
        assert len(data) > 65536
        with server.client() as client:
            huge = {"kind": "encoder", "sha256": sha256(data), "size_bytes": len(data), "filename": "x" * 100_000}
            response = client.post("/api/artifacts/uploads", json=huge)
            assert response.status_code == 413 and "limit of 65536 bytes" in response.json()["detail"]
            # The two bodies that are files keep the upload limit.
            assert upload(client, data, "encoder", sha256(data)).status_code == 201
            created = client.post("/api/artifacts/uploads", json={"kind": "encoder", "sha256": sha256(data),
                                                                  "size_bytes": len(data)}).json()
            patched = client.patch(f"/api/artifacts/uploads/{created['id']}", content=data,
                                   headers={"Upload-Offset": "0"})
            assert patched.status_code == 200 and patched.json()["offset"] == len(data)
            assert client.post(f"/api/artifacts/uploads/{created['id']}/complete").status_code == 201
    finally:
        server.stop()


def test_upload_sessions_reserve_disk_and_are_listed_a_page_at_a_time(tmp_path: Path) -> None:
    import shutil

    data_dir = tmp_path / "data"
    server = start_server(data_dir, env={"NEUROLENS_MAX_UPLOAD_BYTES": str(2**60)})
    try:
        with server.client() as client:
            def create(size: int) -> httpx.Response:
                return client.post("/api/artifacts/uploads", json={"kind": "encoder", "sha256": "a" * 64,
                                                                   "size_bytes": size})

            share = int(shutil.disk_usage(data_dir).free * 0.6)
            first = create(share)
            assert first.status_code == 201, first.text
            second = create(share)  # fits the disk alone, not beside the first one's promise
            assert second.status_code == 507 and "promised to unfinished uploads" in second.json()["detail"]
            assert client.delete(f"/api/artifacts/uploads/{first.json()['id']}").status_code == 204
            second = create(share)
            assert second.status_code == 201
            assert client.delete(f"/api/artifacts/uploads/{second.json()['id']}").status_code == 204

            ids = [create(1000 + i).json()["id"] for i in range(5)]
            page = client.get("/api/artifacts/uploads", params={"limit": 2}).json()
            assert page["count"] == 5 and [u["id"] for u in page["data"]] == ids[:2]
            page = client.get("/api/artifacts/uploads", params={"limit": 2, "offset": 4}).json()
            assert page["count"] == 5 and [u["id"] for u in page["data"]] == ids[4:]
            assert client.get("/api/artifacts/uploads", params={"limit": 0}).status_code == 422
        server.stop()
        server = start_server(data_dir, env={"NEUROLENS_MAX_UPLOAD_BYTES": str(2**60)})
        with server.client() as client:  # the index is rebuilt from disk at start
            assert [u["id"] for u in client.get("/api/artifacts/uploads").json()["data"]] == ids
    finally:
        server.stop()
