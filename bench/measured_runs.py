"""What the memory benches share: one trainer process measured by its kernel-reported peak RSS,
and the summary of peaks against a baseline mode and the issue's bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def run_measured_trainer(name: str, job_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m trainer run`` on ``spec`` in its own process to completion.

    The peak resident set is the kernel's ``ru_maxrss`` for that child, taken with
    ``os.wait4``, so it covers start-up, data loading, every step, checkpoints and the export.
    Output goes to ``<job_dir>/<name>-stdout.jsonl`` and ``<name>-stderr.log``; a failed run
    ends the bench with its stderr.

    Returns
    -------
    dict
        ``peak`` (bytes), ``seconds``, ``events`` (the offline events), ``finished`` (the last
        finished event), ``reported_peak`` (the largest peak the trainer reported itself) and
        ``stderr`` (its text).
    """
    job_dir.mkdir(exist_ok=True)
    (job_dir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    stdout, stderr = job_dir / f"{name}-stdout.jsonl", job_dir / f"{name}-stderr.log"
    started = time.perf_counter()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(job_dir / "spec.json")],
                                cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    log = stderr.read_text()
    if code != 0:
        sys.exit(f"{name} failed with exit code {code}:\n{log[-3000:]}")
    events = [json.loads(line) for line in stdout.read_text().splitlines() if line.startswith("{")]
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return {"peak": usage.ru_maxrss * scale, "seconds": elapsed, "events": events,
            "finished": [e for e in events if e["kind"] == "finished"][-1],
            "reported_peak": max((e.get("peak_rss_bytes") or 0) for e in events), "stderr": log}


def report_against_baseline(results: dict[str, dict[str, Any]], modes: list[str],
                            table: dict[str, tuple[str, Any, float | None]], baseline: str,
                            baseline_label: str) -> bool:
    """Print each of ``modes``' peaks as a ratio to ``baseline``'s, and against its bound.

    ``table`` maps a mode to ``(label, overrides, bound in GB or None)`` (the benches' ``MODES``).
    Returns whether any bound was exceeded.
    """
    failed = False
    for mode in modes:
        label, _, bound = table[mode]
        if baseline in results and mode != baseline:
            print(f"ratio {label} / {baseline_label}: {results[mode]['peak'] / results[baseline]['peak']:.2f}")
        if bound is not None:
            ok = results[mode]["peak"] <= bound * GB
            failed |= not ok
            print(f"{label}: {'within' if ok else 'OVER'} the {bound:.1f} GB bound")
    return failed
