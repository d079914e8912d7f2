"""Which Stage 2 defaults make a tiny model read the EEG: a sweep behind docs/notes/defaults.md.

One Stage 1 encoder (the config given, the defaults unless told) is trained once on
``synthetic``; then Stage 2 runs once per row of :data:`ROWS` on the same encoder and data, each
a real trainer process (``python -m trainer run``, offline, one intra-op thread as on the CI
machine), and prints its BLEU-1 from EEG and noise, the paired-bootstrap interval of their
difference, the share of distinct predictions, the steps it ran and its wall time.

Usage::

    python bench/defaults_sweep.py [--rows today,lr3e-3,defaults] [--dataset synthetic]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measured_runs import run_measured_trainer  # noqa: E402

QUIET = {"log_every_s": 30.0}
# Rows that pin today's settings also switch off early stopping, to measure those settings alone.
PLAIN: dict = {"patience": 0}
# Each row: Stage 2 config overrides on top of the current defaults ({} is the defaults).
ROWS: dict[str, dict] = {
    "defaults": {},
    "today": {"steps": 200, "lr": 5e-4, "batch_size": 8, **PLAIN},
    "today-b16": {"steps": 200, "lr": 5e-4, "batch_size": 16, **PLAIN},
    "lr3e-3-200": {"steps": 200, "lr": 3e-3, "batch_size": 16, **PLAIN},
    "lr3e-3-400": {"steps": 400, "lr": 3e-3, "batch_size": 16, **PLAIN},
    "lr3e-3-600": {"steps": 600, "lr": 3e-3, "batch_size": 16, **PLAIN},
    "lr1e-3-600": {"steps": 600, "lr": 1e-3, "batch_size": 16, **PLAIN},
    "lr3e-3-600-b8": {"steps": 600, "lr": 3e-3, "batch_size": 8, **PLAIN},
    "demo": {"steps": 2000, "lr": 3e-3, "batch_size": 16, "max_target_tokens": 16, **PLAIN},
}


def spec(job_dir: Path, stage: str, config: dict, dataset: str, cache: Path, encoder: Path | None = None) -> dict:
    return {"job_id": 1, "stage": stage, "dataset": dataset, "config": config, "job_dir": str(job_dir),
            "api_url": "", "token": "t", "cache_dir": str(cache), "encoder_path": str(encoder) if encoder else None}


def line(name: str, run: dict) -> str:
    m = run["finished"]["metrics"]
    return (f"{name:>16}: steps {m['steps']:4d}  BLEU-1 eeg {m['test_bleu1_eeg']:.3f} noise {m['test_bleu1_noise']:.3f}"
            f"  eeg-noise {m['test_bleu1_eeg_minus_noise']:+.3f} [{m['test_bleu1_eeg_minus_noise_ci_low']:+.3f}, "
            f"{m['test_bleu1_eeg_minus_noise_ci_high']:+.3f}]  distinct {m['test_distinct_eeg']:.2f}"
            f"  best_step {m.get('best_step', 'n/a')}  {run['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--stage1", default="{}", help="Stage 1 config overrides as JSON (default: the defaults)")
    parser.add_argument("--encoder", type=Path, help="an encoder file to use instead of training one")
    args = parser.parse_args()
    import json

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="defaults-sweep-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        encoder = args.encoder or work / "stage1" / "final" / "encoder.safetensors"
        if args.encoder is None:
            s1 = run_measured_trainer("stage1", work / "stage1", spec(
                work / "stage1", "stage1", {"preset": "tiny", **QUIET, **json.loads(args.stage1)}, args.dataset, cache))
            m1 = s1["finished"]["metrics"]
            print(f"stage 1: steps {m1['steps']}  val_loss {m1['val_loss']}  best_step {m1.get('best_step', 'n/a')}  "
                  f"{s1['seconds']:.0f} s", flush=True)
        for name in args.rows.split(","):
            config = {"preset": "tiny", **QUIET, **ROWS[name]}
            run = run_measured_trainer(name, work / name, spec(work / name, "stage2", config, args.dataset, cache, encoder))
            print(line(name, run), flush=True)


if __name__ == "__main__":
    main()
