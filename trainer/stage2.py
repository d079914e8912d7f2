"""Stage 2: train BART to write the sentence read, from the frozen Stage 1 encoder's embeddings.

Read top to bottom: encoder file -> sentences and text-disjoint splits -> encoder embeddings of
every sentence, computed once and cached as a ``.npy`` memmap (the encoder is then released, so
it is not resident while BART trains) -> tokenizer trained on the training sentences -> bridge +
BART -> teacher-forced training loop (same checkpoint / stop / report logic as Stage 1) ->
free-running evaluation on the test split, EEG vs noise -> ``final/model.safetensors`` and
``final/report.json``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

from trainer import export
from trainer.checkpoint import atomic_write_text, find_latest_checkpoint
from trainer.config import EncoderConfig, Stage2Config
from trainer.data.recordings import Recording, cut, load_dataset
from trainer.data.text import split_by_text
from trainer.data.tokenizer import tokenizer_from_json, tokenizer_json, train_tokenizer
from trainer.evaluate import bleu1, embed_windows, wer
from trainer.exceptions import CheckpointError, DatasetError, TrainerError
from trainer.models.bridge import EEGToText, bart_config
from trainer.protocol import EXIT_OK, EXIT_STOPPED, ArtifactKind, JobSpec
from trainer.reporter import Reporter
from trainer.training import (DataOrder, TrainState, load_training_checkpoint, lr_at, make_optimizer,
                              pick_device, save_training_checkpoint, seed_everything)

log = logging.getLogger(__name__)
REPORT_EXAMPLES = 10


def sentence_windows(recordings: list[Recording], config: EncoderConfig
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each sentence's first ``window_s`` seconds from its onset (zero-padded), masks and texts."""
    xs, masks, texts = [], [], []
    for rec in recordings:
        for sentence in rec.sentences:
            xs.append(cut(rec, int(round(sentence.onset_s * config.sfreq)), config.window_samples))
            masks.append(rec.present)
            texts.append(sentence.text)
    if not texts:
        raise DatasetError("No sentences found: Stage 2 needs 'sentence:<text>' annotations "
                           "or a *_events.tsv with trial_type 'sentence' beside each recording.")
    return np.stack(xs), np.stack(masks), texts


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_embeddings(job_dir: Path, encoder_path: Path, x: np.ndarray, mask: np.ndarray,
                      device: torch.device) -> np.ndarray:
    """Encoder embeddings ``(n, P, D)`` of all sentence windows, cached in the job dir.

    The cache is keyed by the encoder file's sha256 and the number of windows, written through a
    temporary file and ``os.replace``, and opened as a read-only memmap, so a resumed attempt
    skips the encoder entirely and large caches need not fit in memory.
    """
    cache = job_dir / "cache" / f"embeddings-{_file_digest(encoder_path)[:16]}-{len(x)}.npy"
    if not cache.is_file():
        encoder = export.load_encoder(encoder_path).to(device)
        for p in encoder.parameters():
            p.requires_grad_(False)
        started = time.perf_counter()
        embeddings = embed_windows(encoder, x, mask, device=device)
        log.info("embedded %d sentences in %.1f s", len(x), time.perf_counter() - started)
        del encoder
        gc.collect()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".tmp-{cache.name}-{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.save(fh, embeddings)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cache)
    return np.load(cache, mmap_mode="r")


def encode_targets(tokenizer, texts: list[str], max_tokens: int) -> np.ndarray:
    """Token ids ``(n, max_tokens)`` with ``-100`` where there is no token (ignored by the loss)."""
    ids = tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    labels = np.full((len(texts), max_tokens), -100, dtype=np.int64)
    for row, seq in enumerate(ids):
        labels[row, :len(seq)] = seq
    return labels


def _checkpoint_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: json.loads(v) for k, v in (fh.metadata() or {}).items() if k != "format"}
    except Exception as exc:
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
    else:
        if saved is not None:  # a resumed run keeps the exact tokenizer and BART config it began with
            tokenizer = tokenizer_from_json(saved["tokenizer"])
            bart = BartForConditionalGeneration(BartConfig.from_dict(saved["bart_config"]))
        else:
            tokenizer = train_tokenizer(texts, config.bart.vocab_size)
            max_positions = max(encoder_config.n_patches, config.max_target_tokens) + 2
            bart = BartForConditionalGeneration(bart_config(config.bart, len(tokenizer), max_positions))
    return tokenizer, EEGToText(encoder_config.d_model, bart)


@torch.no_grad()
def teacher_forced_loss(model: EEGToText, embeddings: np.ndarray, labels: np.ndarray, batch: int,
                        device: torch.device) -> float | None:
    if len(labels) == 0:
        return None
    model.eval()
    total = 0.0
    for i in range(0, len(labels), batch):
        e = torch.from_numpy(np.ascontiguousarray(embeddings[i:i + batch])).to(device)
        y = torch.from_numpy(labels[i:i + batch]).to(device)
        total += model(e, y).item() * len(y)
    model.train()
    return total / len(labels)


@torch.no_grad()
def decode(model: EEGToText, tokenizer, embeddings: np.ndarray, config: Stage2Config, device: torch.device) -> list[str]:
    """Free-running generation for each embedding sequence."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(embeddings), 32):
        e = torch.from_numpy(np.ascontiguousarray(embeddings[i:i + 32])).to(device)
        ids = model.generate(e, config.max_target_tokens, config.num_beams)
        out.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    return out


def run(spec: JobSpec, config: Stage2Config, reporter: Reporter) -> int:
    """Train the EEG-to-text model for ``spec``; returns the exit code (OK or STOPPED)."""
    job_dir = Path(spec.job_dir)
    device = pick_device(config.device)
    if config.unfreeze_steps:
        raise TrainerError("Invalid unfreeze_steps "
                           f"{config.unfreeze_steps}: end-to-end fine-tuning is not implemented yet; use 0.")
    if not spec.encoder_path:
        raise TrainerError("Stage 2 needs an encoder: the job spec has no encoder_path.")
    encoder_path = Path(spec.encoder_path)
    encoder_config, encoder_tensors = export.read_encoder_file(encoder_path)
    export.load_encoder(encoder_path)  # validates keys and shapes now, before any data work

    # -- data: sentences, splits, cached embeddings ---------------------------------------------------
    recordings = load_dataset(spec.dataset, Path(spec.cache_dir or spec.job_dir), encoder_config)
    x, mask, texts = sentence_windows(recordings, encoder_config)
    splits = np.asarray(split_by_text(texts))
    index = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
    if len(index["train"]) == 0:
        raise DatasetError(f"Only {len(set(texts))} distinct sentences: too few to keep a training split.")
    embeddings = cached_embeddings(job_dir, encoder_path, x, mask, device)
    del x
    reporter.event("log", message=", ".join(f"{len(v)} {k}" for k, v in index.items()) + " sentences")

    # -- model, tokenizer, optimizer, resume ----------------------------------------------------------
    latest = find_latest_checkpoint(job_dir)
    saved = _checkpoint_metadata(latest) if latest is not None else None
    seed_everything(config.seed)
    train_texts = [texts[i] for i in index["train"]]
    tokenizer, model = build_model(config, encoder_config, train_texts, saved)
    model.to(device)
    labels = encode_targets(tokenizer, texts, config.max_target_tokens)
    optimizer = make_optimizer(list(model.parameters()), config)
    metadata = {"stage_config": config.to_dict(), "encoder_config": encoder_config.to_dict(),
                "bart_config": model.bart.config.to_dict(), "tokenizer": tokenizer_json(tokenizer)}
    state = TrainState()
    if latest is not None:
        state, _ = load_training_checkpoint(latest, model, optimizer, {})
        log.info("resumed from %s at step %d", latest, state.step)
    order = DataOrder(len(index["train"]), config.seed, state)
    last_saved = state.step if latest is not None else -1
    checkpoint_path = latest
    log.info("BART %s: %d parameters, vocabulary %d", config.preset,
             sum(p.numel() for p in model.parameters()), len(tokenizer))

    def save() -> Path:
        path = save_training_checkpoint(job_dir, model, optimizer, state, {}, metadata)
        reporter.event("checkpoint", step=state.step, message=str(path.relative_to(job_dir)))
        return path

    # -- loop -----------------------------------------------------------------------------------------
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
        for _ in range(config.accumulation_steps):
            rows = index["train"][order.next(config.micro_batch_size)]
            rows.sort()  # memmap reads in file order
            e = torch.from_numpy(np.ascontiguousarray(embeddings[rows])).to(device)
            y = torch.from_numpy(labels[rows]).to(device)
            loss = model(e, y)
            (loss / config.accumulation_steps).backward()
            step_loss += loss.item() / config.accumulation_steps
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state.step += 1
        state.record(step_loss)
        reporter.update(step=state.step, loss=step_loss, lr=lr,
                        samples_per_s=config.batch_size / max(time.perf_counter() - started, 1e-9))
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint_path = save()
            last_saved = state.step

    # -- evaluation: free-running generation on the test split, EEG vs noise ------------------------------
    test = index["test"]
    train_emb = np.asarray(embeddings[index["train"]])
    rng = np.random.default_rng(config.seed)
    noise = (rng.standard_normal((len(test),) + embeddings.shape[1:]) * train_emb.std(axis=(0, 1))
             + train_emb.mean(axis=(0, 1))).astype(np.float32)
    references = [texts[i] for i in test]
    from_eeg = decode(model, tokenizer, np.asarray(embeddings[test]), config, device)
    from_noise = decode(model, tokenizer, noise, config, device)
    metrics = {
        "steps": state.step,
        "train_loss": state.losses[-1] if state.losses else None,
        "val_loss": teacher_forced_loss(model, np.asarray(embeddings[index["val"]]), labels[index["val"]],
                                        config.micro_batch_size, device),
        "test_bleu1_eeg": bleu1(from_eeg, references),
        "test_bleu1_noise": bleu1(from_noise, references),
        "test_wer_eeg": wer(from_eeg, references),
        "test_wer_noise": wer(from_noise, references),
        "sentences_train": int(len(index["train"])),
        "sentences_val": int(len(index["val"])),
        "sentences_test": int(len(test)),
    }
    report = {
        "dataset": spec.dataset, "encoder_path": str(encoder_path), "metrics": metrics,
        "examples": [{"reference": r, "from_eeg": h, "from_noise": n}
                     for r, h, n in list(zip(references, from_eeg, from_noise))[:REPORT_EXAMPLES]],
    }

    # -- export ---------------------------------------------------------------------------------------
    final = job_dir / export.FINAL_DIRNAME
    model_path = export.save_model(final / export.MODEL_FILENAME, encoder_tensors, encoder_config,
                                   model.bridge, model.bart, tokenizer_json(tokenizer))
    report_path = atomic_write_text(final / export.REPORT_FILENAME, json.dumps(report, indent=2))
    reporter.register(ArtifactKind.model, str(model_path.relative_to(job_dir)))
    reporter.register(ArtifactKind.report, str(report_path.relative_to(job_dir)))
    if checkpoint_path is None:
        checkpoint_path = find_latest_checkpoint(job_dir)
    if checkpoint_path is not None:
        reporter.register(ArtifactKind.checkpoint, str(checkpoint_path.relative_to(job_dir)))
    reporter.event("finished", step=state.step, loss=metrics["train_loss"], metrics=metrics)
    log.info("stage 2 finished: %s", metrics)
    return EXIT_OK
