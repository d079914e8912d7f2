"""Peak memory of Stage 2 with the ``large`` encoder (~265M parameters) and the ``base`` BART.

Each mode is a real trainer run, ``python -m trainer run spec.json`` (offline: events on
stdout), in its own process. The peak resident set of each run is the kernel's ``ru_maxrss``
for that child, taken with ``os.wait4``, so it covers everything the job does: start-up, data
loading, caching the encoder's features, every training step, the checkpoints, the free-running
evaluation and the export of the model file. It is printed with its ratio to the baseline
measured in the same run:

- ``frozen``: phase 1 only. The encoder is loaded once to cache its features and released;
  BART and the bridge train with Adafactor fused into backward;
- ``unfrozen``: one frozen step, then phase 2: the encoder is attached and trained end to end,
  Adafactor fused into backward, activation checkpointing in the encoder;
- ``baseline``: everything resident and plain: the whole run end to end (encoder attached from
  the first step), torch AdamW, ``loss.backward(); clip; step()``, no checkpointing.

The bounds the issue sets (frozen 2.0 GB, unfrozen 3.0 GB; GB = 10^9 bytes) are checked and
the exit status is 1 when one is exceeded.

The encoder is the ``large`` preset with fresh random weights, written here (its values do not
change memory; training one with Stage 1 would take an hour on a 2-core CPU), with 0.5 s
windows (2 patches per channel: 128 tokens) and a 60-sentence synthetic dataset (32 channels),
so that encoding every sentence and the few steps of a 400M-parameter model take minutes.
Weights, gradients and optimizer state, which dominate the peak, do not depend on either.

Usage::

    python bench/memory_stage2.py [--steps 3] [--modes frozen,unfrozen,baseline]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measured_runs import GB, report_against_baseline, run_measured_trainer  # noqa: E402

N_SENTENCES = 60
WINDOW_S = 0.5
BASE = {"preset": "base", "lr": 1e-4, "warmup_steps": 1, "log_every_s": 5.0, "seed": 0, "batch_size": 4,
        "max_target_tokens": 16, "bootstrap_samples": 100}
LEAN = {"optimizer": "adafactor", "fused_optimizer": True, "activation_checkpointing": True}
MODES = {
    "frozen": ("frozen (phase 1)", lambda steps: {**LEAN, "unfreeze_steps": 0}, 2.0),
    "unfrozen": ("unfrozen (phase 2)", lambda steps: {**LEAN, "unfreeze_steps": steps - 1}, 3.0),
    "baseline": ("baseline (all resident, plain adamw)",
                 lambda steps: {"optimizer": "adamw", "fused_optimizer": False, "activation_checkpointing": False,
                                "unfreeze_steps": steps}, None),
}


def run_mode(name: str, overrides: dict, steps: int, work: Path, dataset: Path, encoder: Path) -> dict:
    """Run one trainer process to completion; its peak RSS, wall time and last events."""
    job_dir = work / name
    config = {**BASE, **overrides, "steps": steps, "checkpoint_every": steps}
    spec = {"job_id": 1, "stage": "stage2", "dataset": str(dataset), "config": config, "job_dir": str(job_dir),
            "api_url": "", "token": "bench", "cache_dir": str(work / "cache"), "encoder_path": str(encoder)}
    run = run_measured_trainer(name, job_dir, spec)
    finished = run["finished"]
    return {**run, "steps": finished["step"], "loss": finished["loss"],
            "unfrozen": finished["metrics"]["unfrozen_steps"], "config": config}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode (default 3)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; expected some of {', '.join(MODES)}")

    import torch

    from trainer import export
    from trainer.config import EncoderConfig, Stage2Config
    from trainer.memory_prediction import predict_peak_bytes
    from trainer.data.synthetic import ensure_synthetic_dataset
    from trainer.models.multiview import MultiViewEncoder, count_parameters

    with tempfile.TemporaryDirectory(prefix="neurolens-bench-") as tmp:
        work = Path(tmp)
        # Written here, once, so that no measured process pays for them.
        enc_config = dataclasses.replace(EncoderConfig.from_name("large"), window_s=WINDOW_S)
        dataset = ensure_synthetic_dataset(work / "data", "synthetic", 0, enc_config.channels, n_sentences=N_SENTENCES)
        torch.manual_seed(0)
        encoder = MultiViewEncoder(enc_config)
        n_encoder = count_parameters(encoder)
        encoder_path = export.save_encoder(encoder, work / "encoder.safetensors")
        del encoder
        results = {}
        for mode in modes:
            label, overrides, _ = MODES[mode]
            results[mode] = r = run_mode(mode, overrides(args.steps), args.steps, work, dataset, encoder_path)
            predicted = predict_peak_bytes(Stage2Config(**r["config"]), enc_config)
            print(f"{label}: peak {r['peak'] / GB:.2f} GB ({r['steps']} steps, {r['unfrozen']} end to end, of the "
                  f"{n_encoder / 1e6:.1f}M-parameter encoder and BART base in {r['seconds']:.0f} s, final loss "
                  f"{r['loss']:.4f}, trainer-reported peak {r['reported_peak'] / GB:.2f} GB, predicted "
                  f"{predicted / GB:.2f} GB)", flush=True)

    failed = report_against_baseline(results, modes, MODES, "baseline", "baseline")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
