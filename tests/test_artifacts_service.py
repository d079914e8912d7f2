"""Adding an artifact: row and file together, or neither; a trainer's registration changes its job's ETag."""

from __future__ import annotations

import pytest
from sqlmodel import Session, func, select

from server.artifacts import add_artifact
from server.db import make_engine, upgrade_database
from server.models import Artifact, Job
from server.storage import ArtifactStore, StorageError
from trainer.protocol import ArtifactKind


@pytest.fixture
def session(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    with Session(make_engine(url)) as session:
        yield session


def stored_files(store: ArtifactStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))


def test_a_trainer_file_is_linked_in_and_its_job_changes(session, tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    job = Job(stage="stage1", dataset="synthetic", config={})
    session.add(job)
    session.commit()
    version = job.version
    source = tmp_path / "job" / "encoder.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"weights")

    public = add_artifact(session, store, source, ArtifactKind.encoder, source.name, "ab" * 32, 7, job=job)

    assert (public.job_id, public.kind, public.filename, public.size_bytes) == (job.id, ArtifactKind.encoder,
                                                                                source.name, 7)
    assert store.path_of(f"{public.id}/encoder.safetensors").read_bytes() == b"weights"
    assert source.exists()  # linked, not moved: the trainer's checkpoint rotation is its own
    session.refresh(job)
    assert job.version == version + 1


def test_an_upload_is_moved_in(session, tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    upload = store.root / ".uploads" / "oneshot-1"
    upload.parent.mkdir()
    upload.write_bytes(b"{}")

    public = add_artifact(session, store, upload, ArtifactKind.report, "report.json", "cd" * 32, 2, move=True)

    assert public.job_id is None
    assert not upload.exists()
    assert store.path_of(f"{public.id}/report.json").read_bytes() == b"{}"


@pytest.mark.parametrize(("move", "error"), [(False, StorageError), (True, FileNotFoundError)])
def test_a_file_that_cannot_be_stored_leaves_no_row_and_no_file(session, tmp_path, move, error):
    store = ArtifactStore(tmp_path / "artifacts")
    before = stored_files(store)
    with pytest.raises(error):
        add_artifact(session, store, tmp_path / "gone.safetensors", ArtifactKind.encoder, "encoder.safetensors",
                     "ef" * 32, 1, move=move)
    assert session.exec(select(func.count()).select_from(Artifact)).one() == 0
    assert stored_files(store) == before
