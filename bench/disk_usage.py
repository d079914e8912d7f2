"""What the disk figures cost: ``DiskUsage`` over 100 job directories, cold and cached.

Each job gets the files a real one holds (spec, log, three kept checkpoints, the final encoder,
hard-linked into the artifact store as the server does), so inodes shared by a job directory
and the store are met as in production. The baseline is a plain ``os.walk`` sum of the same
files (which counts each hard link twice); run ``python bench/disk_usage.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.housekeeping import DiskUsage  # noqa: E402
from server.storage import ArtifactStore  # noqa: E402

JOBS = 100


def make_jobs(root: Path) -> tuple[Path, ArtifactStore]:
    jobs, store = root / "jobs", ArtifactStore(root / "artifacts")
    for job_id in range(1, JOBS + 1):
        job_dir = jobs / str(job_id)
        (job_dir / "final").mkdir(parents=True)
        (job_dir / "spec.json").write_text("{}")
        (job_dir / "trainer.log").write_bytes(b"x" * 20_000)
        for step in (250, 500, 750):
            folder = job_dir / "checkpoints" / f"step-{step:06d}"
            folder.mkdir(parents=True)
            (folder / "checkpoint.safetensors").write_bytes(b"0" * 50_000)
            (folder / "state.json").write_text("{}")
        (job_dir / "final" / "encoder.safetensors").write_bytes(b"1" * 30_000)
        store.add_file(job_dir / "final" / "encoder.safetensors", job_id, "encoder.safetensors")
    return jobs, store


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs, store = make_jobs(root)
        started = time.perf_counter()
        naive = sum(os.path.getsize(Path(d) / f) for top in (jobs, store.root) for d, _, files in os.walk(top)
                    for f in files)
        plain_s = time.perf_counter() - started
        disk = DiskUsage(root, jobs, store)
        started = time.perf_counter()
        for job_id in range(1, JOBS + 1):
            disk.job_bytes(job_id, 1, [job_id])
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        for job_id in range(1, JOBS + 1):
            disk.job_bytes(job_id, 1, [job_id])
        cached_s = time.perf_counter() - started
        started = time.perf_counter()
        totals = disk.totals()
        totals_s = time.perf_counter() - started
        print(f"{JOBS} jobs: plain os.walk sum {plain_s * 1e3:.1f} ms ({naive} B, links twice); job_bytes cold "
              f"{cold_s * 1e3:.1f} ms, cached {cached_s * 1e3:.2f} ms; totals {totals_s * 1e3:.1f} ms "
              f"({totals['jobs_bytes']} + {totals['artifacts_bytes']} B)")


if __name__ == "__main__":
    main()
