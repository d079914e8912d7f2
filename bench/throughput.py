"""Training throughput (samples/s) of Stage 1 and Stage 2 on each device present.

For each device (the CPU, and CUDA when torch sees a GPU) and each stage, two numbers from the
same run of this script:

- **plain**: a minimal single-process loop of the same model, written here: float32, torch
  AdamW, ``loss.backward(); step()``, no activation checkpointing, random inputs of the real
  shapes. It is the baseline.
- **neurolens**: the real trainer, ``python -m trainer run spec.json`` (offline: its progress
  events on stdout carry each step's samples/s), with the job's defaults for that device: on
  CUDA bfloat16 autocast; on the CPU float32, Stage 1 lean (Adafactor fused into backward,
  activation checkpointing).

The ratio neurolens / plain is printed for each. Extra Stage 1 rows on the CPU measure bfloat16
autocast there (the evidence behind ``precision: auto`` choosing float32 on CPUs) and, with
``--processes 2``, two data-parallel gloo processes under torchrun.

Figures are medians over steps after ``--warmup`` steps. Usage::

    python bench/throughput.py [--devices cpu,cuda] [--steps 20] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.executors.local import trainer_command  # noqa: E402
from trainer.config import BART_PRESETS, EncoderConfig  # noqa: E402
from trainer.memory_prediction import predict_gpu_bytes  # noqa: E402
from trainer.stages import parse_config  # noqa: E402
from trainer.models.multiview import MultiViewEncoder, SSLHead, random_token_mask  # noqa: E402

# Per device: (Stage 1 encoder preset, Stage 2 BART preset, batch size). The CPU sizes keep a
# 2-core run to minutes; on a GPU the seed's encoder size and a batch that fills it a little.
SIZES = {"cpu": ("small", "small", 8), "cuda": ("large", "base", 32)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rate(step, device: str, batch: int, steps: int, warmup: int) -> float:
    """Median samples/s of ``step()`` (one forward, backward and optimizer step) after ``warmup``."""
    times = []
    for _ in range(warmup + steps):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times[warmup:])


# -- the plain loops (baseline) ---------------------------------------------------------------------
def plain_stage1(preset: str, batch: int, device: str, steps: int, warmup: int) -> float:
    config = EncoderConfig.from_name(preset)
    torch.manual_seed(0)
    encoder, head = MultiViewEncoder(config).to(device), SSLHead(config).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, len(config.channels), config.window_samples, device=device)
    channel_mask = torch.ones(batch, len(config.channels), dtype=torch.bool, device=device)
    token_mask = random_token_mask(batch, config, 0.5, torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        loss, _ = head(encoder, x, channel_mask, token_mask, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_rate(step, device, batch, steps, warmup)


def plain_stage2(encoder_preset: str, bart_preset: str, batch: int, device: str, steps: int, warmup: int) -> float:
    from transformers import BartConfig, BartForConditionalGeneration

    encoder = EncoderConfig.from_name(encoder_preset)
    preset = BART_PRESETS[bart_preset]
    tokens = encoder.n_patches  # BART's input: one vector per time patch (MultiViewEncoder.patch_features),
    features = len(encoder.channels) * encoder.d_model  # every channel's state side by side
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=preset.vocab_size, d_model=preset.d_model, encoder_layers=preset.encoder_layers,
        decoder_layers=preset.decoder_layers, encoder_attention_heads=preset.attention_heads,
        decoder_attention_heads=preset.attention_heads, encoder_ffn_dim=preset.ffn_dim,
        decoder_ffn_dim=preset.ffn_dim, max_position_embeddings=128)).to(device)
    project = torch.nn.Linear(features, preset.d_model).to(device)
    optimizer = torch.optim.AdamW([*bart.parameters(), *project.parameters()], lr=1e-4)
    embeddings = torch.randn(batch, tokens, features, device=device)
    labels = torch.randint(3, preset.vocab_size, (batch, 32), device=device)

    def step() -> None:
        bart(inputs_embeds=project(embeddings), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_rate(step, device, batch, steps, warmup)


# -- the real trainer -------------------------------------------------------------------------------
def trainer_rate(job_dir: Path, stage: str, config: dict, cache: Path, warmup: int, processes: int = 1,
                 encoder_path: Path | None = None) -> float:
    """Median samples/s the trainer reported for steps after ``warmup``; on CUDA it also prints
    the GPU memory peak the trainer reported beside the admission's prediction."""
    job_dir.mkdir(parents=True)
    spec = {"job_id": 1, "stage": stage, "dataset": "synthetic", "config": {**config, "devices": processes},
            "job_dir": str(job_dir), "api_url": "", "token": "bench", "cache_dir": str(cache),
            "encoder_path": str(encoder_path) if encoder_path else None}
    (job_dir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(trainer_command(job_dir / "spec.json", processes), cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} trainer failed:\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rates = [e["samples_per_s"] for e in events
             if e.get("kind") == "progress" and e.get("samples_per_s") and e.get("step", 0) > warmup]
    gpu_peak = max((e.get("gpu_peak_reserved_bytes") or 0 for e in events), default=0)
    if gpu_peak:
        predicted = predict_gpu_bytes(parse_config(stage, {**config, "devices": processes}))
        print(f"  {stage} GPU peak reserved {gpu_peak / 1e9:.2f} GB, predicted {predicted / 1e9:.2f} GB "
              f"(measured / predicted {gpu_peak / predicted:.2f})")
    if not rates:
        raise SystemExit(f"{stage} trainer reported no steps after the warm-up; raise --steps")
    return statistics.median(rates)


def row(label: str, value: float, baseline: float) -> str:
    return f"{label:<44} {value:9.2f} samples/s   {value / baseline:5.2f}x plain"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", default=",".join(present), help="comma-separated: cpu, cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of each median")
    parser.add_argument("--processes", type=int, default=0, help="also run Stage 1 on the CPU in N gloo processes")
    parser.add_argument("--stages", default="1,2",
                        help="'1,2' or '1' (Stage 2 starts from the encoder Stage 1 trains, so it needs Stage 1)")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if "1" not in stages:
        parser.error("--stages must include 1: Stage 2 trains on the encoder the Stage 1 run exports")
    # Both loops keep torch's default thread count (one per physical core): the trainer
    # subprocess does too, so neither side is given more of the CPU than the other.

    with tempfile.TemporaryDirectory(prefix="neurolens-throughput-") as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        for device in args.devices.split(","):
            if device == "cuda" and not torch.cuda.is_available():
                print("cuda: no CUDA device, skipped")
                continue
            enc_preset, bart_preset, batch = SIZES[device]
            name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
            print(f"== {device}: {name}; Stage 1 encoder {enc_preset}, Stage 2 BART {bart_preset}, batch {batch}")
            steps = args.warmup + args.steps
            common = {"steps": steps, "batch_size": batch, "warmup_steps": 1, "checkpoint_every": 10 * steps,
                      "log_every_s": 0.1, "device": device}
            stage1 = {**common, "preset": enc_preset, "probe_words": 0, "val_windows": 0}

            plain1 = plain_stage1(enc_preset, batch, device, args.steps, args.warmup)
            print(row("stage1 plain loop (fp32, AdamW)", plain1, plain1))
            ours1 = trainer_rate(root / f"{device}-s1", "stage1", stage1, cache, args.warmup)
            print(row("stage1 neurolens trainer (defaults)", ours1, plain1))
            if device == "cuda":
                fp32 = trainer_rate(root / "cuda-s1-fp32", "stage1", {**stage1, "precision": "float32"}, cache,
                                    args.warmup)
                print(row("stage1 neurolens trainer, float32", fp32, plain1))
            if device == "cpu":
                bf16 = trainer_rate(root / "cpu-s1-bf16", "stage1", {**stage1, "precision": "bfloat16"}, cache,
                                    args.warmup)
                print(row("stage1 neurolens trainer, bf16 autocast", bf16, plain1))
                if args.processes > 1:
                    ddp = trainer_rate(root / "cpu-s1-ddp", "stage1", stage1, cache, args.warmup, args.processes)
                    print(row(f"stage1 neurolens trainer, {args.processes} gloo processes", ddp, plain1))

            if "2" not in stages:
                continue
            encoder = root / f"{device}-s1" / "final" / "encoder.safetensors"
            plain2 = plain_stage2(enc_preset, bart_preset, batch, device, args.steps, args.warmup)
            print(row("stage2 plain loop (fp32, AdamW)", plain2, plain2))
            stage2 = {**common, "preset": bart_preset}
            ours2 = trainer_rate(root / f"{device}-s2", "stage2", stage2, cache, args.warmup, encoder_path=encoder)
            print(row("stage2 neurolens trainer (defaults)", ours2, plain2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
