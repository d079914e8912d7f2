"""Is Stage 1 worth it? Stage 2 from the Stage 1 encoder against a random-init one and end to end.

Three arms, each Stage 2 on the same data, the same steps and the same three seeds, each run a
real trainer process (``python -m trainer run``, offline; peak RSS from ``os.wait4``):

- ``stage1``: the encoder a default Stage 1 job trains (once, seed 0), frozen (phase 1 only);
- ``random``: a random-init encoder of the same shape (seed 0), frozen the same way;
- ``end-to-end``: that random-init encoder unfrozen from step 0 (``unfreeze_steps = steps``),
  trained with BART from the start: the seed's "old approach".

Early stopping is off (``patience`` 0) so every arm takes the same steps; each keeps its best
validation state as any job does. Printed per arm: BLEU-1 (EEG - noise) with its 95% interval
(the median over seeds of each), the interval's lowest low, retrieval top-1 from EEG if the
report has it (``n/a`` otherwise), the share of distinct predictions, peak memory and time
(medians); then the ratios between arms.

Usage::

    python bench/stage_value.py [--preset tiny] [--steps 600] [--seeds 0,1,2] [--dataset synthetic]
                                [--arms stage1,random,end-to-end] [--lr 0 (the preset's)]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measured_runs import run_measured_trainer  # noqa: E402

ARMS = ("stage1", "random", "end-to-end")
MB = 1e6


def spec(job_dir: Path, stage: str, config: dict, dataset: str, cache: Path, encoder: Path | None = None) -> dict:
    return {"job_id": 1, "stage": stage, "dataset": dataset, "config": config, "job_dir": str(job_dir),
            "api_url": "", "token": "t", "cache_dir": str(cache), "encoder_path": str(encoder) if encoder else None}


def random_encoder(preset: str, path: Path) -> Path:
    """A random-init encoder of the preset's shape, written as Stage 1 would write one."""
    import torch

    from trainer import export
    from trainer.config import Stage1Config
    from trainer.models.multiview import MultiViewEncoder

    torch.manual_seed(0)
    return export.save_encoder(MultiViewEncoder(Stage1Config(preset=preset).encoder), path)


def summarise(runs: list[dict]) -> dict:
    metrics = [r["finished"]["metrics"] for r in runs]

    def median(key: str) -> float | None:
        values = [m[key] for m in metrics if m.get(key) is not None]
        return statistics.median(values) if values else None

    return {"diff": median("test_bleu1_eeg_minus_noise"), "low": median("test_bleu1_eeg_minus_noise_ci_low"),
            "high": median("test_bleu1_eeg_minus_noise_ci_high"),
            "worst_low": min(m["test_bleu1_eeg_minus_noise_ci_low"] for m in metrics),
            "eeg": median("test_bleu1_eeg"), "noise": median("test_bleu1_noise"), "distinct": median("test_distinct_eeg"),
            "top1": median("test_retrieval_top1_eeg"), "top1_chance": median("test_retrieval_top1_chance"),
            "peak": statistics.median(r["peak"] for r in runs), "seconds": statistics.median(r["seconds"] for r in runs),
            "per_seed": [round(m["test_bleu1_eeg_minus_noise"], 3) for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="encoder and BART preset (default tiny)")
    parser.add_argument("--steps", type=int, default=600, help="Stage 2 steps of every arm (default 600: what "
                                                                 "steps 0 resolves to at tiny on synthetic)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--lr", type=float, default=0.0, help="Stage 2 learning rate of every arm (default: the preset's)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per trainer: the numbers of a shared CPU
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    quiet = {"preset": args.preset, "log_every_s": 30.0}
    stage2 = {**quiet, "steps": args.steps, "patience": 0, "lr": args.lr}

    with tempfile.TemporaryDirectory(prefix="stage-value-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        encoders = {"random": random_encoder(args.preset, work / "random.safetensors")}
        encoders["end-to-end"] = encoders["random"]
        if "stage1" in arms:
            s1 = run_measured_trainer("stage1", work / "stage1", spec(work / "stage1", "stage1", quiet, args.dataset, cache))
            m1 = s1["finished"]["metrics"]
            print(f"stage 1 ({args.preset}, defaults): {m1['steps']} steps, val_loss {m1['val_loss']:.4f} "
                  f"(best step {m1.get('best_step')}), {s1['seconds']:.0f} s, peak {s1['peak'] / MB:.0f} MB", flush=True)
            encoders["stage1"] = work / "stage1" / "final" / "encoder.safetensors"
        results: dict[str, dict] = {}
        for arm in arms:
            runs = []
            for seed in seeds:
                config = {**stage2, "seed": seed, **({"unfreeze_steps": args.steps} if arm == "end-to-end" else {})}
                name = f"{arm}-{seed}"
                runs.append(run_measured_trainer(name, work / name, spec(work / name, "stage2", config, args.dataset,
                                                                          cache, encoders[arm])))
                m = runs[-1]["finished"]["metrics"]
                print(f"  {name}: eeg - noise {m['test_bleu1_eeg_minus_noise']:+.3f} "
                      f"[{m['test_bleu1_eeg_minus_noise_ci_low']:+.3f}, {m['test_bleu1_eeg_minus_noise_ci_high']:+.3f}]"
                      f", distinct {m['test_distinct_eeg']:.2f}, best step {m.get('best_step')}, "
                      f"{runs[-1]['seconds']:.0f} s", flush=True)
            results[arm] = summarise(runs)

    print(f"\nStage 2 at {args.preset} on {args.dataset}, {args.steps} steps, lr {args.lr or 'of the preset'}, "
          f"seeds {args.seeds} (medians over seeds)")
    print(f"{'arm':>11} | {'BLEU-1 eeg':>10} | {'noise':>5} | {'eeg - noise [95% CI]':>24} | {'lowest low':>10} | "
          f"{'top-1':>5} | {'distinct':>8} | {'peak MB':>7} | {'time s':>6}")
    for arm, r in results.items():
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.2f}"
        print(f"{arm:>11} | {r['eeg']:10.3f} | {r['noise']:5.3f} | {r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
              f"{'':>2} | {r['worst_low']:+10.3f} | {top1:>5} | {r['distinct']:8.2f} | {r['peak'] / MB:7.0f} | {r['seconds']:6.0f}")
    for a, b in (("stage1", "random"), ("stage1", "end-to-end"), ("end-to-end", "random")):
        if a in results and b in results:
            ra, rb = results[a], results[b]
            gap = f"{ra['diff'] / rb['diff']:.2f}" if rb["diff"] and rb["diff"] > 0 else "n/a (denominator <= 0)"
            print(f"ratio {a} / {b}: eeg - noise {gap}, peak {ra['peak'] / rb['peak']:.2f}, "
                  f"time {ra['seconds'] / rb['seconds']:.2f}")
    print(json.dumps({arm: r["per_seed"] for arm, r in results.items()}))


if __name__ == "__main__":
    main()
