"""Stage 1: self-supervised training of the MultiView encoder.

Read top to bottom: data -> model -> optimizer -> resume -> loop (micro-batches accumulated to
``batch_size``, warm-up + cosine LR, checkpoint every ``checkpoint_every`` steps, stop requests
honoured between steps) -> evaluation -> export of ``final/encoder.safetensors``.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer import export
from trainer.checkpoint import find_latest_checkpoint
from trainer.config import Stage1Config
from trainer.data.recordings import load_dataset, windows
from trainer.evaluate import word_probe_finish, word_probe_start
from trainer.exceptions import CheckpointError
from trainer.memory import FusedOptimizer
from trainer.models.multiview import MultiViewEncoder, SSLHead, count_parameters, random_token_mask
from trainer.protocol import EXIT_OK, EXIT_STOPPED, ArtifactKind, JobSpec
from trainer.reporter import Reporter
from trainer.training import (DataOrder, TrainState, load_training_checkpoint, lr_at, make_optimizer,
                              pick_device, save_training_checkpoint, seed_everything)

log = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(encoder: MultiViewEncoder, head: SSLHead, x: np.ndarray, mask: np.ndarray,
                    config: Stage1Config, device: torch.device) -> float | None:
    """SSL loss on held-out windows, with a fixed masking seed so runs are comparable."""
    if len(x) == 0:
        return None
    encoder.eval(), head.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    total, count = 0.0, 0
    for i in range(0, len(x), config.micro_batch_size):
        xb = torch.from_numpy(x[i:i + config.micro_batch_size]).to(device)
        mb = torch.from_numpy(mask[i:i + config.micro_batch_size]).to(device)
        tm = random_token_mask(len(xb), config.encoder, config.mask_ratio, generator).to(device)
        loss, _ = head(encoder, xb, mb, tm, config.agreement_weight, config.visible_weight)
        total += loss.item() * len(xb)
        count += len(xb)
    encoder.train(), head.train()
    return total / count


def run(spec: JobSpec, config: Stage1Config, reporter: Reporter) -> int:
    """Train the encoder for ``spec``; returns the exit code (OK or STOPPED)."""
    job_dir = Path(spec.job_dir)
    device = pick_device(config.device)
    enc_config = config.encoder

    # -- data ------------------------------------------------------------------------------------
    recordings = load_dataset(spec.dataset, Path(spec.cache_dir or spec.job_dir), enc_config)
    (train_x, train_mask), (val_x, val_mask) = windows(recordings, enc_config)
    reporter.event("log", message=f"{len(train_x)} training and {len(val_x)} validation windows "
                                  f"of {enc_config.window_s:g} s from {len(recordings)} recording(s)")

    # -- model and optimizer -----------------------------------------------------------------------
    seed_everything(config.seed)
    encoder = MultiViewEncoder(enc_config, activation_checkpointing=config.activation_checkpointing)
    head = SSLHead(enc_config)
    model = nn.ModuleDict({"encoder": encoder, "head": head}).to(device)
    optimizer = make_optimizer(list(model.parameters()), config)
    fused = isinstance(optimizer, FusedOptimizer)
    mask_generator = torch.Generator().manual_seed(config.seed)
    log.info("encoder %s: %d parameters (+%d in the SSL head)", enc_config.name,
             count_parameters(encoder), count_parameters(head))

    # -- resume ------------------------------------------------------------------------------------
    state = TrainState()
    metadata = {"stage_config": config.to_dict(), "encoder_config": enc_config.to_dict()}
    latest = find_latest_checkpoint(job_dir)
    if latest is not None:
        state, saved = load_training_checkpoint(latest, model, optimizer, {"mask": mask_generator})
        if saved.get("encoder_config") != enc_config.to_dict():
            raise CheckpointError(f"{latest} was written for a different encoder config; "
                                  f"delete it or use the preset it was trained with.")
        log.info("resumed from %s at step %d", latest, state.step)
    order = DataOrder(len(train_x), config.seed, state)
    last_saved = state.step if latest is not None else -1
    checkpoint_path = latest

    def save() -> Path:
        path = save_training_checkpoint(job_dir, model, optimizer, state, {"mask": mask_generator}, metadata)
        reporter.event("checkpoint", step=state.step, message=str(path.relative_to(job_dir)))
        return path

    # -- loop --------------------------------------------------------------------------------------
    reporter.update(step=state.step, total=config.steps)
    reporter.start_heartbeats()
    model.train()
    while state.step < config.steps:
        if reporter.stop_requested:
            if last_saved != state.step:
                save()
            log.info("stopping at step %d (%s requested)", state.step, reporter.stop_requested)
            return EXIT_STOPPED
        started = time.perf_counter()
        lr = lr_at(state.step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.accumulation_steps):
            if fused:  # the hooks step the parameters during the last micro-batch's backward
                optimizer.start_micro_batch(last=micro == config.accumulation_steps - 1)
            idx = order.next(config.micro_batch_size)
            x = torch.from_numpy(train_x[idx]).to(device)
            channel_mask = torch.from_numpy(train_mask[idx]).to(device)
            token_mask = random_token_mask(len(idx), enc_config, config.mask_ratio, mask_generator).to(device)
            loss, _ = head(encoder, x, channel_mask, token_mask, config.agreement_weight, config.visible_weight)
            (loss / config.accumulation_steps).backward()
            step_loss += loss.item() / config.accumulation_steps
        if not fused:  # fused: no full gradient exists to take a norm of (see FusedOptimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state.step += 1
        state.record(step_loss)
        reporter.update(step=state.step, loss=step_loss, lr=lr,
                        samples_per_s=config.batch_size / max(time.perf_counter() - started, 1e-9))
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint_path = save()
            last_saved = state.step

    # -- evaluation and export ---------------------------------------------------------------------
    metrics: dict[str, float | int | None] = {
        "steps": state.step,
        "train_loss": state.losses[-1] if state.losses else None,
        "train_loss_avg10": float(np.mean(state.losses[-10:])) if state.losses else None,
        "val_loss": validation_loss(encoder, head, val_x[:config.val_windows], val_mask[:config.val_windows],
                                    config, device) if config.val_windows else None,
        "parameters": count_parameters(encoder),
    }
    probe = (word_probe_start(encoder, recordings, device, config.probe_words, batch=config.micro_batch_size)
             if config.probe_words else None)
    encoder_path = export.save_encoder(encoder, job_dir / export.FINAL_DIRNAME / export.ENCODER_FILENAME)
    reporter.register(ArtifactKind.encoder, str(encoder_path.relative_to(job_dir)))
    if checkpoint_path is None:
        checkpoint_path = find_latest_checkpoint(job_dir)
    if checkpoint_path is not None:
        reporter.register(ArtifactKind.checkpoint, str(checkpoint_path.relative_to(job_dir)))
    if probe is not None:
        # The trained weights are saved and no longer needed: release them (the fused
        # optimizer's hooks make a reference cycle, hence the collect) before the probe builds
        # its random-init encoder, so a large run never holds two encoders at once.
        del model, encoder, head, optimizer
        gc.collect()
        metrics.update(word_probe_finish(probe, device))
    reporter.event("finished", step=state.step, loss=metrics["train_loss"], metrics=metrics)
    log.info("stage 1 finished: %s", metrics)
    return EXIT_OK
