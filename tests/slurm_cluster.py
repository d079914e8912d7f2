"""A real one-node Slurm cluster for the Slurm executor's tests (deploy/slurm/cluster.sh).

The session fixture uses a cluster that already answers (CI starts one in ``.ci/run``), or starts
one as root and stops it at the end; without Slurm's packages, or without root to start it, the
tests that need it skip and say what to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO_ROOT / "deploy" / "slurm" / "cluster.sh"


def cluster_answers() -> bool:
    return subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A Slurm cluster that takes jobs, for the whole session."""
    missing = [name for name in ("sbatch", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
               if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): run `make slurm` as root, which "
                    f"installs Debian's slurmctld, slurmd, slurm-client and munge")
    if cluster_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(f"no Slurm cluster answers, and starting one needs root: run `{CLUSTER_SCRIPT} start` as root")
    started = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, f"the test cluster did not start:\n{started.stdout}\n{started.stderr}"
    try:
        yield
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=60)


def jobs_under(folder: Path) -> list[str]:
    """Ids of the Slurm jobs (any state slurmctld still keeps) whose working directory is in ``folder``."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %Z"], capture_output=True,
                         text=True, timeout=30).stdout
    folder = folder.resolve()
    return [job_id for job_id, _, workdir in (line.partition(" ") for line in out.splitlines())
            if Path(workdir.strip()).is_relative_to(folder)]


def cancel_jobs_under(folder: Path) -> None:
    """Cancel what a test left running in Slurm (the server's shutdown leaves batch jobs running)."""
    ids = jobs_under(folder)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
