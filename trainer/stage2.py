"""Stage 2: train BART to write the sentence read, from the Stage 1 encoder's features.

Read top to bottom: encoder file -> sentences and text-disjoint splits -> encoder features of
every sentence window, computed once and cached on disk (the encoder is then released, so it
is not resident while BART trains) -> tokenizer and BART (preset or pretrained directory) ->
teacher-forced training loop, phase 1 on cached features; phase 2 (the last ``unfreeze_steps``)
with the encoder attached and trained end to end by the lean optimizer -> free-running
evaluation on the test split against noise and shuffled EEG (:mod:`trainer.text_eval`) ->
``final/model.safetensors`` (loadable without NeuroLens) and ``final/report.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

from trainer import export
from trainer.artifact_format import FINAL_DIRNAME, MODEL_FILENAME, REPORT_FILENAME, ArtifactFormatError, read_header
from trainer.checkpoint import atomic_write_text, find_latest_checkpoint
from trainer.config import EncoderConfig, Stage2Config
from trainer.controls import sentence_lengths
from trainer.data.recordings import Recording, cut, load_dataset
from trainer.data.text import split_sentences
from trainer.data.tokenizer import tokenizer_from_json, tokenizer_json, train_tokenizer
from trainer.distributed import World, autocast, autocast_dtype
from trainer.exceptions import CheckpointError, DatasetError, TrainerError
from trainer.feature_cache import cached_features, feature_statistics
from trainer.memory import FusedOptimizer
from trainer.models.bridge import EEGToText, bart_config
from trainer.protocol import EXIT_STOPPED, ArtifactKind, JobSpec
from trainer.reporter import Reporter
from trainer.text_eval import DECODE_BATCH, evaluate, teacher_forced_loss
from trainer.training import (DataOrder, TrainingRun, TrainState, best_weights_path, load_best_weights,
                              load_training_checkpoint, make_optimizer, pick_device, save_best_weights,
                              save_training_checkpoint, seed_everything)
from trainer.verdict import RunFacts, verdict

log = logging.getLogger(__name__)


def sentence_windows(recordings: list[Recording], config: EncoderConfig
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[str | None]]:
    """Each sentence's first ``window_s`` seconds from its onset (zero-padded), masks, texts and
    the subject who read it."""
    xs, masks, texts, subjects = [], [], [], []
    for rec in recordings:
        for sentence in rec.sentences:
            xs.append(cut(rec, int(round(sentence.onset_s * config.sfreq)), config.window_samples))
            masks.append(rec.present)
            texts.append(sentence.text)
            subjects.append(rec.subject)
    if not texts:
        raise DatasetError("No sentences found: Stage 2 needs 'sentence:<text>' annotations "
                           "or a *_events.tsv with trial_type 'sentence' beside each recording.")
    return np.stack(xs), np.stack(masks), texts, subjects


@torch.no_grad()
def _encoded(encoder: nn.Module, x: np.ndarray, mask: np.ndarray, rows: np.ndarray,
             device: torch.device) -> Iterator[np.ndarray]:
    """Phase 2's features of ``rows``: the attached encoder over the raw windows, batch by batch."""
    encoder.eval()
    for i in range(0, len(rows), DECODE_BATCH):
        r = rows[i:i + DECODE_BATCH]
        yield encoder.patch_features(torch.from_numpy(x[r]).to(device), torch.from_numpy(mask[r]).to(device)).cpu().numpy()


def encode_targets(tokenizer, texts: list[str], max_tokens: int) -> np.ndarray:
    """Token ids ``(n, max_tokens)`` with ``-100`` where there is no token (ignored by the loss)."""
    ids = tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    labels = np.full((len(texts), max_tokens), -100, dtype=np.int64)
    for row, seq in enumerate(ids):
        labels[row, :len(seq)] = seq
    return labels


def _checkpoint_metadata(path: Path) -> dict:
    try:
        return read_header(path).json_metadata()
    except (OSError, ArtifactFormatError) as exc:
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}") from exc


def build_model(config: Stage2Config, encoder_config: EncoderConfig, texts: list[str], saved: dict | None):
    """Tokenizer and :class:`EEGToText` for a fresh run, a resumed one, or a pretrained BART."""
    if config.pretrained_dir:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(config.pretrained_dir, local_files_only=True)
            bart = BartForConditionalGeneration.from_pretrained(config.pretrained_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TrainerError(f"Cannot load a pretrained BART from {config.pretrained_dir}: {exc}") from exc
        if bart.config.max_position_embeddings < max(encoder_config.n_patches, config.max_target_tokens):
            raise TrainerError(f"The BART in {config.pretrained_dir} has {bart.config.max_position_embeddings} "
                               f"positions; Stage 2 needs {max(encoder_config.n_patches, config.max_target_tokens)}.")
    elif saved is not None:  # a resumed run keeps the exact tokenizer and BART config it began with
        tokenizer = tokenizer_from_json(saved["tokenizer"])
        bart = BartForConditionalGeneration(BartConfig.from_dict(saved["bart_config"]))
    else:
        tokenizer = train_tokenizer(texts, config.bart.vocab_size)
        max_positions = max(encoder_config.n_patches, config.max_target_tokens) + 2
        bart = BartForConditionalGeneration(bart_config(config.bart, len(tokenizer), max_positions))
    feature_dim = len(encoder_config.channels) * encoder_config.d_model
    return tokenizer, EEGToText(encoder_config.n_patches, feature_dim, bart)


def attach_encoder(model: EEGToText, encoder_path: Path, config: Stage2Config, device: torch.device) -> None:
    """Phase 2: load the encoder (trainable, with activation checkpointing if configured)."""
    encoder = export.load_encoder(encoder_path).to(device)
    encoder.activation_checkpointing = config.activation_checkpointing
    model.attach_encoder(encoder)


def extend_optimizer(old, model: EEGToText, config: Stage2Config):
    """A new optimizer over all of ``model`` (the encoder now included), carrying ``old``'s state.

    The encoder's parameters come after the bridge's and BART's in ``model.parameters()``, so
    the old optimizer's state, indexed by parameter position, applies unchanged to the first
    ones; the encoder's start fresh. A fused optimizer's hooks are removed first, so no
    parameter is stepped twice.
    """
    if isinstance(old, FusedOptimizer):
        old.remove_hooks()
    new = make_optimizer(list(model.parameters()), config)
    state = new.state_dict()
    state["state"].update(old.state_dict()["state"])
    new.load_state_dict(state)
    return new


def run(spec: JobSpec, config: Stage2Config, reporter: Reporter, world: World) -> int:
    """Train the EEG-to-text model for ``spec``; returns the exit code (OK or STOPPED).

    ``world`` is one process: Stage 2 does not train in data parallel (its config refuses
    ``devices`` above 1).
    """
    job_dir = Path(spec.job_dir)
    device = pick_device(config.device, world)
    amp_dtype = autocast_dtype(config.precision, device)  # bfloat16 on a GPU that has it, else float32
    if not spec.encoder_path:
        raise TrainerError("Stage 2 needs an encoder: the job spec has no encoder_path.")
    encoder_path = Path(spec.encoder_path)
    encoder_config = export.check_encoder_file(encoder_path)  # before any data work

    # -- data: sentences, splits, cached features ----------------------------------------------------
    reporter.event("phase", message="loading data")
    recordings = load_dataset(spec.dataset, Path(spec.cache_dir or spec.job_dir), encoder_config,
                              report=lambda message, metrics: reporter.event("log", message=message, metrics=metrics))
    x, mask, texts, subjects = sentence_windows(recordings, encoder_config)
    parts, split = split_sentences(texts, subjects, config.test_subjects, config.split.get("text_disjoint", True))
    parts = np.asarray(parts)
    index = {name: np.flatnonzero(parts == name) for name in ("train", "val", "test")}
    if len(index["train"]) == 0:
        if config.test_subjects and set(subjects) <= set(config.test_subjects):
            raise DatasetError(f"Every sentence was read by the held-out subjects {', '.join(config.test_subjects)}: "
                               f"nothing is left to train on; hold out fewer subjects.")
        if config.test_subjects and split["excluded_sentences"]:
            raise DatasetError(f"No training sentences left: the subjects other than {', '.join(config.test_subjects)} "
                               f"read only sentences the held-out subjects read too ({split['excluded_sentences']} "
                               f"left out); set split.text_disjoint to false to test on new subjects reading seen "
                               f"sentences.")
        raise DatasetError(f"Only {len(set(texts))} distinct sentences: too few to keep a training split.")
    if not config.steps:
        config = config.with_steps_for(len(index["train"]))
        reporter.event("log", message=f"{config.steps} steps: {config.epochs:g} passes over {len(index['train'])} "
                                      f"training sentences in batches of {config.batch_size}, within "
                                      f"{config.AUTO_STEPS[0]} to {config.AUTO_STEPS[1]} (config steps 0)")
    reporter.update(total=config.steps)
    reporter.event("phase", message="caching features")
    cache = cached_features(job_dir, encoder_path, x, mask, device)
    reporter.event("log", message=f"split by {split['split']}: " + "; ".join(
        f"{name} {split[name]['sentences']} sentences ({split[name]['texts']} texts) of "
        f"{len(split[name]['subjects'])} subjects" for name in ("train", "val", "test"))
        + (f"; {split['excluded_sentences']} left out" if split["excluded_sentences"] else ""))

    # -- model, tokenizer, optimizer, resume ----------------------------------------------------------
    latest = find_latest_checkpoint(job_dir)
    saved = _checkpoint_metadata(latest) if latest is not None else None
    seed_everything(config.seed)
    tokenizer, model = build_model(config, encoder_config, [texts[i] for i in index["train"]], saved)
    if saved is None:  # a resumed run restores these buffers from its checkpoint
        mean, std = feature_statistics(cache.batches(index["train"], 64))
        model.bridge.set_statistics(torch.from_numpy(mean), torch.from_numpy(std))
    if saved is not None and saved.get("phase") == 2:
        attach_encoder(model, encoder_path, config, device)
    model.to(device)
    labels = encode_targets(tokenizer, texts, config.max_target_tokens)
    optimizer = make_optimizer(list(model.parameters()), config)
    metadata = {"stage_config": config.to_dict(), "encoder_config": encoder_config.to_dict(),
                "bart_config": model.bart.config.to_dict(), "tokenizer": tokenizer_json(tokenizer),
                "phase": 1 if model.encoder is None else 2}
    state = TrainState()
    if latest is not None:
        state, _ = load_training_checkpoint(latest, model, optimizer, {})
        log.info("resumed from %s at step %d (phase %d)", latest, state.step, metadata["phase"])
    order = DataOrder(len(index["train"]), config.seed, state)
    log.info("BART %s: %d parameters, vocabulary %d", config.pretrained_dir or config.preset,
             sum(p.numel() for p in model.bart.parameters()), len(tokenizer))

    def save() -> Path:
        return save_training_checkpoint(job_dir, model, optimizer, state, {}, metadata)

    def features(rows: np.ndarray) -> Iterator[np.ndarray]:
        """Phase 1: the cache; phase 2: the fine-tuned encoder, a batch at a time. The encoder is
        taken now: decoding detaches it from the model while it reads these batches."""
        encoder = model.encoder
        if encoder is None:
            return cache.batches(rows, DECODE_BATCH)
        return _encoded(encoder, x, mask, rows, device)

    def validate() -> float | None:
        return teacher_forced_loss(model, features(index["val"]), labels[index["val"]], device)

    training = TrainingRun(job_dir, config, state, reporter, save, resumed=latest, validate=validate,
                           save_best=lambda step: save_best_weights(job_dir, step, model, {"phase": metadata["phase"]}))

    def batch_inputs(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if model.encoder is None:
            return torch.from_numpy(cache.rows(rows)).to(device), None
        return torch.from_numpy(x[rows]).to(device), torch.from_numpy(mask[rows]).to(device)

    # -- loop -----------------------------------------------------------------------------------------
    reporter.event("phase", message="training")
    training.begin()
    model.train()
    while training.running:
        if training.stopped(reporter.stop_requested):
            return EXIT_STOPPED
        if state.step >= config.frozen_steps and model.encoder is None:
            attach_encoder(model, encoder_path, config, device)
            optimizer = extend_optimizer(optimizer, model, config)
            metadata["phase"] = 2
            reporter.event("log", message=f"phase 2 from step {state.step}: encoder unfrozen")
        fused = isinstance(optimizer, FusedOptimizer)
        training.start_step(optimizer)
        step_loss = 0.0
        for micro in range(config.accumulation_steps):
            if fused:  # the hooks step the parameters during the last micro-batch's backward
                optimizer.start_micro_batch(last=micro == config.accumulation_steps - 1)
            rows = index["train"][order.next(config.micro_batch_size)]
            inputs, channel_mask = batch_inputs(rows)
            with autocast(device, amp_dtype):
                loss = model(inputs, torch.from_numpy(labels[rows]).to(device), channel_mask).float()
            (loss / config.accumulation_steps).backward()
            step_loss += loss.item() / config.accumulation_steps
        if not fused:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        training.end_step(step_loss)

    # -- the best state by validation loss, then evaluation: free-running generation on the test
    # split, EEG vs noise vs shuffled EEG ----------------------------------------------------------------
    reporter.event("phase", message="evaluating")
    if isinstance(optimizer, FusedOptimizer):
        optimizer.remove_hooks()
    del optimizer  # its state is in the checkpoint; evaluation and export do not need it
    if state.best_step >= 0 and state.best_step != state.step:
        if _checkpoint_metadata(best_weights_path(job_dir, state.best_step)).get("phase") == 1:
            model.encoder = None  # the best predates phase 2: it reads the Stage 1 encoder's features
        load_best_weights(job_dir, state.best_step, model)
        log.info("the final model is the best state, step %d (validation loss %.4f)", state.best_step,
                 state.best_val_loss)

    if model.encoder is None:  # the bridge holds the training features' statistics
        noise_mean = model.bridge.mean.cpu().numpy()
    else:
        noise_mean, _ = feature_statistics(features(index["train"]))
    lengths, length_unit = sentence_lengths(recordings)
    metrics, examples, details = evaluate(model, tokenizer, features, texts, index, labels, noise_mean, config,
                                          device, lengths, length_unit, subjects)
    metrics = {"steps": state.step, "train_loss": state.losses[-1] if state.losses else None,
               "frozen_steps": config.frozen_steps, "unfrozen_steps": config.unfreeze_steps,
               **training.best_summary(), **metrics,
               "sentences_train": int(len(index["train"])), "sentences_val": int(len(index["val"])),
               "sentences_test": int(len(index["test"])), "split": split["split"],
               **{f"subjects_{name}": len(split[name]["subjects"]) for name in ("train", "val", "test")}}
    report = {
        "dataset": spec.dataset, "encoder_path": str(encoder_path), "decoding": "free-running generate()",
        "note": "val_loss_teacher_forced_diagnostic is teacher-forced and is not a decoding score.",
        "split": split, "metrics": metrics, "examples": examples,
        "verdict": verdict(metrics, RunFacts(
            steps=state.step, batch_size=config.batch_size, lr=config.lr, train_sentences=int(len(index["train"])),
            train_texts=len({texts[i] for i in index["train"]}), losses=list(state.losses))),
        **details,
    }

    # -- export ---------------------------------------------------------------------------------------
    reporter.event("phase", message="saving")
    final = job_dir / FINAL_DIRNAME
    model_path = export.save_model(final / MODEL_FILENAME, encoder_path, encoder_config, model,
                                   tokenizer_json(tokenizer))
    report_path = atomic_write_text(final / REPORT_FILENAME, json.dumps(report, indent=2))
    training.register(ArtifactKind.model, model_path)
    training.register(ArtifactKind.report, report_path)
    training.register_checkpoint()
    cache.close()
    # The verdict's sentence is the last log line, so the CLI and the job page show it as it is.
    reporter.event("log", message="Stage 2 verdict: " + report["verdict"]["sentence"])
    return training.finish(metrics, "stage 2")
