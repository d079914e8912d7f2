"""Peak memory of Stage 1 on the ``large`` encoder (~265M parameters): lean modes vs plain AdamW.

Each mode is a real trainer run, ``python -m trainer run spec.json`` (offline: events on
stdout), in its own process, on the built-in synthetic dataset (32 channels). The peak resident
set of each run is the kernel's ``ru_maxrss`` for that child, taken with ``os.wait4`` (so it
covers start-up, data loading, every step, the checkpoint and the encoder export), and is
printed with its ratio to the plain AdamW baseline measured in the same run, and beside the
peak :func:`trainer.memory_prediction.predict_peak_bytes` predicts for that config (what the scheduler
admits jobs by):

- ``lean mb=1``: Adafactor fused into backward, activation checkpointing, micro-batch 1;
- ``lean mb=1 x8``: the same with gradients accumulated to an effective batch of 8 (bfloat16
  accumulation buffers);
- ``lean mb=1 resumed``: the ``lean mb=1`` job run again for two more steps, so that it starts
  by loading that run's checkpoint (weights, optimizer state) into its model;
- ``plain adamw``: torch AdamW, ``loss.backward(); clip; step()``, no checkpointing, batch 1.

The bounds the issue sets (lean 2.0 GB, accumulated 2.5 GB; GB = 10^9 bytes) are checked and
the exit status is 1 when one is exceeded. Windows are 0.5 s (the preset's 0.25 s patches, so
2 per channel: 128 tokens) and the final validation uses 8 windows, so that the 45 forward and
backward passes of a 265M-parameter model take minutes, not hours, on a 2-core CPU; weights,
gradients and optimizer state, which dominate the peak, do not depend on the window.

Usage::

    python bench/memory_stage1.py [--steps 5] [--window-s 0.5] [--modes lean-mb1,lean-mb1-resumed,lean-acc8,plain]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measured_runs import GB, report_against_baseline, run_measured_trainer  # noqa: E402
from trainer.config import Stage1Config  # noqa: E402  (needs the path above)
from trainer.memory_prediction import predict_peak_bytes  # noqa: E402

BASE = {"preset": "large", "lr": 1e-4, "warmup_steps": 1, "log_every_s": 5.0, "seed": 0, "probe_words": 0,
        "val_windows": 8}
LEAN = {"optimizer": "adafactor", "fused_optimizer": True, "activation_checkpointing": True, "micro_batch_size": 1}
MODES = {
    "lean-mb1": ("lean mb=1", {**LEAN, "batch_size": 1}, 2.0),
    # The lean-mb1 job again with RESUMED_STEPS more steps: it resumes from that run's checkpoint.
    "lean-mb1-resumed": ("lean mb=1 resumed", {**LEAN, "batch_size": 1}, 2.0),
    "lean-acc8": ("lean mb=1 x8 accumulation", {**LEAN, "batch_size": 8}, 2.5),
    "plain": ("plain adamw", {"optimizer": "adamw", "fused_optimizer": False, "activation_checkpointing": False,
                              "batch_size": 1, "micro_batch_size": 1}, None),
}
RESUMES = {"lean-mb1-resumed": "lean-mb1"}  # mode -> the mode whose job directory it continues
RESUMED_STEPS = 2


def run_mode(name: str, overrides: dict, steps: int, window_s: float, work: Path, cache: Path,
             job_dir: Path | None = None) -> dict:
    """Run one trainer process to completion; its peak RSS, wall time and last events.

    ``job_dir`` (default: a new ``work/name``) may be another mode's, whose checkpoint the run
    then resumes from.
    """
    job_dir = job_dir or work / name
    config = {**BASE, **overrides, "steps": steps, "checkpoint_every": steps, "window_s": window_s}
    spec = {"job_id": 1, "stage": "stage1", "dataset": "synthetic", "config": config, "job_dir": str(job_dir),
            "api_url": "", "token": "bench", "cache_dir": str(cache)}
    run = run_measured_trainer(name, job_dir, spec)
    finished = run["finished"]
    return {**run, "predicted": predict_peak_bytes(Stage1Config(**config)), "steps": finished["step"],
            "loss": finished["loss"], "parameters": finished["metrics"]["parameters"],
            "resumed": "resumed from" in run["stderr"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per mode (default 5)")
    parser.add_argument("--window-s", type=float, default=0.5, help="window length in seconds (default 0.5)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; expected some of {', '.join(MODES)}")
    for mode, base in RESUMES.items():
        if mode in modes and (base not in modes or modes.index(base) > modes.index(mode)):
            parser.error(f"mode {mode!r} continues {base!r}, which must run before it")

    from trainer.config import CHANNELS_32
    from trainer.data.recordings import SYNTHETIC_SEED
    from trainer.data.synthetic import ensure_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="neurolens-bench-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        # Generated here, once, so that no measured process pays for it.
        ensure_synthetic_dataset(cache, "synthetic", SYNTHETIC_SEED, CHANNELS_32)
        results = {}
        for mode in modes:
            label, overrides, _ = MODES[mode]
            if mode in RESUMES:
                r = run_mode(mode, overrides, args.steps + RESUMED_STEPS, args.window_s, work, cache,
                             job_dir=work / RESUMES[mode])
                if not r["resumed"]:
                    sys.exit(f"{mode} did not resume from {RESUMES[mode]}'s checkpoint")
            else:
                r = run_mode(mode, overrides, args.steps, args.window_s, work, cache)
            results[mode] = r
            print(f"{label}: peak {r['peak'] / GB:.2f} GB ({r['steps']} steps of the {r['parameters'] / 1e6:.1f}M-"
                  f"parameter encoder in {r['seconds']:.0f} s, final loss {r['loss']:.4f}, "
                  f"trainer-reported peak {r['reported_peak'] / GB:.2f} GB)", flush=True)
            print(f"{label}: predicted {r['predicted'] / GB:.2f} GB, measured {r['peak'] / GB:.2f} GB "
                  f"(prediction {r['predicted'] / r['peak'] - 1:+.0%})", flush=True)

    failed = report_against_baseline(results, modes, MODES, "plain", "plain adamw")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
