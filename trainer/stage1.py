"""Stage 1: self-supervised training of the MultiView encoder.

Read top to bottom: data -> model -> optimizer -> resume -> loop (micro-batches accumulated to
``batch_size``, warm-up + cosine LR, checkpoint every ``checkpoint_every`` steps, stop requests
honoured between steps) -> evaluation -> export of ``final/encoder.safetensors``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import distributed, export
from trainer.artifact_format import ENCODER_FILENAME, FINAL_DIRNAME
from trainer.checkpoint import find_latest_checkpoint
from trainer.config import ConfigError, Stage1Config
from trainer.distributed import World
from trainer.data.recordings import Recording, load_dataset, windows
from trainer.data.text import check_test_subjects
from trainer.evaluate import probe_word_budget, word_probe_finish, word_probe_start
from trainer.exceptions import CheckpointError, DatasetError
from trainer.memory import FusedOptimizer
from trainer.models.multiview import MultiViewEncoder, SSLHead, count_parameters, random_token_mask
from trainer.protocol import EXIT_OK, EXIT_STOPPED, ArtifactKind, JobSpec
from trainer.reporter import Reporter
from trainer.training import (DataOrder, TrainingRun, TrainState, load_best_weights, load_training_checkpoint,
                              make_optimizer, pick_device, save_best_weights, save_training_checkpoint,
                              seed_everything)

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
        loss, _ = head(encoder, xb, mb, tm, config.agreement_weight, config.visible_weight,
                       config.decorrelation_weight)
        total += loss.item() * len(xb)
        count += len(xb)
    encoder.train(), head.train()
    return total / count


class SSLObjective(nn.Module):
    """Encoder and SSL head as one module whose forward is the training loss.

    DistributedDataParallel wraps one module and hooks its forward; the state-dict keys
    (``encoder.*``, ``head.*``) are what checkpoints have always held.
    """

    def __init__(self, encoder: MultiViewEncoder, head: SSLHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor, token_mask: torch.Tensor,
                agreement_weight: float, visible_weight: float = 0.0,
                decorrelation_weight: float = 0.0) -> torch.Tensor:
        loss, _ = self.head(self.encoder, x, channel_mask, token_mask, agreement_weight, visible_weight,
                            decorrelation_weight)
        return loss


def held_out_removed(recordings: list[Recording], test_subjects: list[str]) -> list[Recording]:
    """The recordings Stage 1 trains on: all but the held-out subjects' (``split.test_subjects``),
    so that a cross-subject Stage 2 test meets subjects the encoder has never seen either."""
    check_test_subjects(test_subjects, [r.subject for r in recordings])
    kept = [r for r in recordings if r.subject not in set(test_subjects)]
    if not kept:
        raise DatasetError(f"Every recording belongs to the held-out subjects {', '.join(test_subjects)}: "
                           f"nothing is left for Stage 1 to train on.")
    return kept


def run(spec: JobSpec, config: Stage1Config, reporter: Reporter, world: World) -> int:
    """Train the encoder for ``spec`` as rank ``world.rank``; returns the exit code (OK or STOPPED)."""
    job_dir = Path(spec.job_dir)
    device = pick_device(config.device, world)
    distributed.init(world, device)
    amp_dtype = distributed.autocast_dtype(config.precision, device)
    enc_config = config.encoder
    if world.size != config.devices:
        log.warning("config.devices is %d but %d processes run; each takes batch_size / %d",
                    config.devices, world.size, world.size)
    if config.batch_size % (world.size * config.micro_batch_size):
        raise ConfigError(f"Invalid micro_batch_size {config.micro_batch_size}: batch_size {config.batch_size} "
                          f"is not a whole number of micro-batches for each of {world.size} processes.")
    per_process = config.batch_size // world.size
    micro_batches = per_process // config.micro_batch_size

    # -- data ------------------------------------------------------------------------------------
    reporter.event("phase", message="loading data")
    with distributed.main_first(world):  # rank 0 fills the shared caches, the others then read them
        recordings = load_dataset(spec.dataset, Path(spec.cache_dir or spec.job_dir), enc_config,
                                  report=lambda message, metrics: reporter.event("log", message=message, metrics=metrics))
        trained_on = held_out_removed(recordings, config.test_subjects)
        (train_x, train_mask), (val_x, val_mask) = windows(trained_on, enc_config)
    reporter.event("log", message=f"{len(train_x)} training and {len(val_x)} validation windows "
                                  f"of {enc_config.window_s:g} s from {len(trained_on)} recording(s)"
                                  + (f"; held-out subjects {', '.join(config.test_subjects)}: "
                                     f"{len(recordings) - len(trained_on)} recording(s) not trained on"
                                     if config.test_subjects else ""))

    if not config.steps:
        config = config.with_steps_for(len(train_x))
        reporter.event("log", message=f"{config.steps} steps: {config.epochs:g} passes over {len(train_x)} training "
                                      f"windows in batches of {config.batch_size}, within {config.AUTO_STEPS[0]} to "
                                      f"{config.AUTO_STEPS[1]} (config steps 0)")
    reporter.update(total=config.steps)

    # -- model and optimizer -----------------------------------------------------------------------
    seed_everything(config.seed)
    encoder = MultiViewEncoder(enc_config, activation_checkpointing=config.activation_checkpointing)
    head = SSLHead(enc_config)
    model = SSLObjective(encoder, head).to(device)
    # Across processes the gradients must be averaged before any parameter steps, so the fused
    # optimizer steps after backward there (same per-parameter state: checkpoints stay portable).
    optimizer = make_optimizer(list(model.parameters()), config, in_backward=not world.distributed)
    fused = isinstance(optimizer, FusedOptimizer) and optimizer.in_backward
    mask_generator = torch.Generator().manual_seed(config.seed)  # on the CPU: same masks on any device
    log.info("encoder %s: %d parameters (+%d in the SSL head) on %s%s", enc_config.name,
             count_parameters(encoder), count_parameters(head), device,
             f", autocast to {amp_dtype}" if amp_dtype else "")

    # -- resume ------------------------------------------------------------------------------------
    state = TrainState()
    metadata = {"stage_config": config.to_dict(), "encoder_config": enc_config.to_dict()}
    latest = find_latest_checkpoint(job_dir) if world.is_main else None
    own = latest is not None  # False when starting from another job's checkpoint (an artifact)
    if latest is None and spec.resume_from:
        latest = Path(spec.resume_from)
    latest, own = distributed.broadcast((latest, own), world)  # every rank loads rank 0's choice
    if latest is not None:
        state, saved = load_training_checkpoint(latest, model, optimizer, {"mask": mask_generator})
        if saved.get("encoder_config") != enc_config.to_dict():
            raise CheckpointError(f"{latest} was written for a different encoder config; "
                                  f"delete it or use the preset it was trained with.")
        log.info("resumed from %s at step %d", latest, state.step)
    order = DataOrder(len(train_x), config.seed, state)
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world.distributed else model

    def save() -> Path | None:
        if not world.is_main:  # every rank holds the same weights and state: rank 0 writes them
            return None
        return save_training_checkpoint(job_dir, model, optimizer, state, {"mask": mask_generator}, metadata)

    def validate() -> float | None:
        # Every rank measures the same windows; the mean makes the early-stopping decision theirs alike.
        value = validation_loss(encoder, head, val_x[:config.val_windows], val_mask[:config.val_windows], config, device)
        return None if value is None else distributed.mean_over_ranks(value, world, device)

    def save_best(step: int) -> Path | None:
        return save_best_weights(job_dir, step, model, {"encoder_config": enc_config.to_dict()}) if world.is_main else None

    # A paused Stage 1 run registers its checkpoint, so that it can be resumed on another machine.
    training = TrainingRun(job_dir, config, state, reporter, save, resumed=latest if own else None,
                           publish_paused=True, validate=validate if config.val_windows else None, save_best=save_best)

    # -- loop --------------------------------------------------------------------------------------
    reporter.event("phase", message="training")
    training.begin()
    model.train()
    while training.running:
        if training.stopped(distributed.agree_on_stop(world, reporter.stop_requested, device)):
            return EXIT_STOPPED
        training.start_step(optimizer)
        # Every rank draws the same global batch and masks, then trains on its own slice of them:
        # N processes see exactly the samples one process would.
        batch = order.next(config.batch_size)
        masks = random_token_mask(config.batch_size, enc_config, config.mask_ratio, mask_generator)
        step_loss = 0.0
        for micro in range(micro_batches):
            last = micro == micro_batches - 1
            if fused:  # the hooks step the parameters during the last micro-batch's backward
                optimizer.start_micro_batch(last=last)
            lo = world.rank * per_process + micro * config.micro_batch_size
            part = slice(lo, lo + config.micro_batch_size)
            idx = batch[part]
            x = torch.from_numpy(train_x[idx]).to(device)
            channel_mask = torch.from_numpy(train_mask[idx]).to(device)
            token_mask = masks[part].to(device)
            # DDP averages gradients across processes in the last micro-batch's backward only.
            sync = contextlib.nullcontext() if last or not world.distributed else trained.no_sync()
            with sync:
                with distributed.autocast(device, amp_dtype):
                    loss = trained(x, channel_mask, token_mask, config.agreement_weight,
                                   config.visible_weight, config.decorrelation_weight).float()
                (loss / micro_batches).backward()
            step_loss += loss.item() / micro_batches
        if not isinstance(optimizer, FusedOptimizer):  # fused: no global norm is taken (see FusedOptimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        training.end_step(distributed.mean_over_ranks(step_loss, world, device))

    # Training is over for every rank: release DDP (its reducer sits in a reference cycle with the
    # fused optimizer's hooks, so it must be collected before its process group goes) and leave the
    # group together. A rank that left it with DDP still alive aborted at exit ("terminate called
    # without an active exception"). Evaluation, export and the probe are rank 0's, on its own.
    del trained
    gc.collect()
    distributed.shutdown(world)
    if not world.is_main:
        return EXIT_OK
    # -- the best state by validation loss, evaluation and export ------------------------------------
    if state.best_step >= 0 and state.best_step != state.step:
        load_best_weights(job_dir, state.best_step, model)
        log.info("the final encoder is the best state, step %d (validation loss %.4f)", state.best_step,
                 state.best_val_loss)
    reporter.event("phase", message="evaluating")
    metrics: dict[str, float | int | None] = {
        "steps": state.step, **training.best_summary(),
        "train_loss": state.losses[-1] if state.losses else None,
        "train_loss_avg10": float(np.mean(state.losses[-10:])) if state.losses else None,
        "val_loss": validation_loss(encoder, head, val_x[:config.val_windows], val_mask[:config.val_windows],
                                    config, device) if config.val_windows else None,
        "parameters": count_parameters(encoder),
        "split": "subjects" if config.test_subjects else "time",
        "recordings_train": len(trained_on), "recordings_held_out": len(recordings) - len(trained_on),
        "subjects_train": len({r.subject for r in trained_on if r.subject is not None}),
    }
    probe_words = probe_word_budget(encoder.config, config.steps, config.batch_size, config.probe_words)
    if probe_words < config.probe_words:
        reporter.event("log", message=f"word probe on at most {probe_words} of probe_words={config.probe_words} "
                                      f"words: it is held to a tenth of the training's compute")
    probe = (word_probe_start(encoder, recordings, device, probe_words, batch=config.micro_batch_size)
             if config.probe_words else None)
    reporter.event("phase", message="saving")
    training.register(ArtifactKind.encoder, export.save_encoder(encoder, job_dir / FINAL_DIRNAME / ENCODER_FILENAME))
    training.register_checkpoint()
    if probe is not None:
        # The trained weights are saved and no longer needed: release them (the fused
        # optimizer's hooks make a reference cycle, hence the collect) before the probe builds
        # its random-init encoder, so a large run never holds two encoders at once.
        del model, encoder, head, optimizer
        gc.collect()
        reporter.event("phase", message="probing")
        metrics.update(word_probe_finish(probe, device))
    return training.finish(metrics, "stage 1")
