"""Pieces both stages' training loops share: device, optimizer, LR schedule, data order,
RNG capture, the checkpoint round trip of a whole training state, and what happens around each
step and at the end (:class:`TrainingRun`: reports, checkpoints, stop requests, registration).

The loops themselves live in :mod:`trainer.stage1` and :mod:`trainer.stage2` and read top to
bottom; what is here is the bookkeeping that must be identical in both for resume to be exact.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer import checkpoint as ckpt
from trainer.artifact_format import CHECKPOINT_FORMAT, STATE_FILENAME
from trainer.config import TrainConfigBase
from trainer.distributed import pick_device  # noqa: F401  (the loops import it from here)
from trainer.exceptions import TrainerError
from trainer.memory import FusedOptimizer
from trainer.protocol import EXIT_OK, ArtifactKind
from trainer.reporter import Reporter

log = logging.getLogger(__name__)

LOSS_TAIL = 50  # losses kept in the checkpoint so a resumed run can report a smoothed loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfigBase,
                   in_backward: bool = True) -> torch.optim.Optimizer | FusedOptimizer:
    """AdamW or transformers' Adafactor, fused into the backward pass if the config asks.

    Adafactor keeps factored second moments (a row and a column vector per matrix) and no first
    moment, so its state is a few MB where AdamW's is twice the weights. A config with
    ``fused_optimizer`` (Stage 1) gets a :class:`~trainer.memory.FusedOptimizer`: one such
    optimizer per parameter, stepped from the gradient hooks (or, with ``in_backward`` False,
    as data-parallel training needs, after backward).
    """
    def build(group: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if config.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            # Our own schedule sets the lr, so Adafactor's relative-step schedule is switched off.
            return Adafactor(group, lr=config.lr, relative_step=False, scale_parameter=False, warmup_init=False)
        # foreach=False when fused: the multi-tensor kernels only pay off across many tensors.
        return torch.optim.AdamW(group, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.01,
                                 foreach=False if getattr(config, "fused_optimizer", False) else None)

    if getattr(config, "fused_optimizer", False):
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[getattr(config, "accumulate_dtype", "float32")]
        return FusedOptimizer(params, build, accumulate_dtype=dtype, in_backward=in_backward)
    return build(params)


def lr_at(step: int, config: TrainConfigBase) -> float:
    """Linear warm-up to ``config.lr`` then cosine decay to 10% of it at ``config.steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    """Index into the current epoch's permutation of the training samples."""
    losses: list[float] = field(default_factory=list)
    """The most recent per-step losses (tail only)."""
    best_step: int = -1
    """Step of the lowest validation loss so far (its weights are in ``best/``); -1: none yet."""
    best_val_loss: float | None = None
    """That validation loss."""
    evals_since_best: int = 0
    """Evaluations since the best one: early stopping ends the run when this reaches ``patience``."""

    def record(self, loss: float) -> None:
        self.losses = (self.losses + [loss])[-LOSS_TAIL:]


class DataOrder:
    """Epoch-wise shuffled sample indices, reproducible from (seed, epoch, position).

    Each epoch's permutation is derived from the seed and the epoch number alone, so a resumed
    run only needs the two counters in :class:`TrainState` to draw the same batches.
    """

    def __init__(self, n: int, seed: int, state: TrainState) -> None:
        if n == 0:
            raise TrainerError("No training samples: the dataset produced nothing to train on.")
        self.n, self.seed, self.state = n, seed, state

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self, count: int) -> np.ndarray:
        out = []
        while len(out) < count:
            perm = self._perm(self.state.epoch)
            take = perm[self.state.position:self.state.position + count - len(out)]
            out.extend(take.tolist())
            self.state.position += len(take)
            if self.state.position >= self.n:
                self.state.epoch += 1
                self.state.position = 0
        return np.asarray(out, dtype=np.int64)


# -- RNG states -------------------------------------------------------------------------------------
def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Torch RNG states as uint8 tensors (global CPU, CUDA if any, and named generators)."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    for name, gen in generators.items():
        out[f"rng.{name}"] = gen.get_state()
    return out


def restore_rng_tensors(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, gen in generators.items():
        if f"rng.{name}" in tensors:
            gen.set_state(tensors[f"rng.{name}"])


def host_rng_state() -> dict[str, Any]:
    """numpy's and Python's global RNG states as JSON-able values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def restore_host_rng_state(data: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))


# -- whole-state checkpoints ------------------------------------------------------------------------
def save_training_checkpoint(job_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | FusedOptimizer,
                             state: TrainState, generators: dict[str, torch.Generator],
                             metadata: dict[str, Any]) -> Path:
    """Checkpoint model, optimizer, RNGs and :class:`TrainState`; returns the file path."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = ckpt.optimizer_to_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors.update(rng_tensors(generators))
    trainer_state = {**asdict(state), "rng": host_rng_state()}
    meta = {**metadata, "trainer_state": trainer_state, "optimizer": optim_meta}
    return ckpt.save_checkpoint(job_dir, state.step, tensors, meta)


def load_training_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | FusedOptimizer,
                             generators: dict[str, torch.Generator]) -> tuple[TrainState, dict[str, Any]]:
    """Validate and restore a checkpoint written by :func:`save_training_checkpoint`.

    Returns
    -------
    state : TrainState
        Step, data-order position and loss tail to continue from.
    metadata : dict
        The decoded metadata (configs) for the caller to compare with its own.
    """
    tensors, meta = ckpt.load_checkpoint_into(path, model, "model.")
    ckpt.optimizer_from_tensors(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")},
                                meta["optimizer"], str(path))
    restore_rng_tensors(tensors, generators)
    trainer_state = dict(meta["trainer_state"])
    restore_host_rng_state(trainer_state.pop("rng"))
    # Checkpoints written before early stopping existed lack the best-so-far fields: they default.
    known = {f.name for f in fields(TrainState)}
    state = TrainState(**{k: v for k, v in trainer_state.items() if k in known})
    return state, meta


# -- the best state by validation loss --------------------------------------------------------------
BEST_DIRNAME = "best"
"""Job-directory folder of the best-validation weights: one file per step, kept while the run or
one of its kept checkpoints names it (:func:`prune_best_weights`)."""


def best_weights_path(job_dir: Path, step: int) -> Path:
    return job_dir / BEST_DIRNAME / f"step-{step:06d}.safetensors"


def save_best_weights(job_dir: Path, step: int, model: torch.nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights as the best state at ``step`` (checkpoint format, weights only,
    so :func:`load_best_weights` validates them like any checkpoint)."""
    kept, aliases = ckpt.dedupe_tensors({f"model.{k}": v for k, v in model.state_dict().items()})
    header = {k: json.dumps(v) for k, v in metadata.items()}
    header.update(aliases=json.dumps(aliases), format=CHECKPOINT_FORMAT, best_step=json.dumps(step))
    return ckpt.atomic_save_safetensors(kept, best_weights_path(job_dir, step), header)


def prune_best_weights(job_dir: Path, current: int) -> None:
    """Delete the best-weights files that neither ``current`` (the run's best step) nor any kept
    checkpoint names (and temporaries a kill left).

    A run resumed from an older checkpoint (the newest one unreadable) finds its best there;
    a file newer than every checkpoint belongs to steps a resumed run redoes.
    """
    root = job_dir / BEST_DIRNAME
    if not root.is_dir():
        return
    keep = {best_weights_path(job_dir, current)}
    for directory in ckpt.list_checkpoints(job_dir):
        try:
            named = json.loads((directory / STATE_FILENAME).read_text()).get("best_step", -1)
        except (OSError, ValueError):  # a torn checkpoint: find_latest_checkpoint removes it
            continue
        if isinstance(named, int) and named >= 0:
            keep.add(best_weights_path(job_dir, named))
    for path in root.iterdir():
        if path not in keep:
            path.unlink(missing_ok=True)


def load_best_weights(job_dir: Path, step: int, model: torch.nn.Module) -> dict[str, Any]:
    """Load the best state at ``step`` into ``model`` in place; returns the file's metadata.

    Raises
    ------
    CheckpointError
        The file is missing, unreadable, or does not match ``model``.
    """
    path = best_weights_path(job_dir, step)
    if not path.is_file():
        raise TrainerError(f"The best-validation weights of step {step} are missing ({path}); "
                           f"the job directory was changed by hand.")
    _, meta = ckpt.load_checkpoint_into(path, model, "model.")
    return meta


# -- around each step, and at the end ---------------------------------------------------------------
class TrainingRun:
    """What both loops do around each optimizer step and after the last: the learning rate, the
    progress report, a checkpoint every ``checkpoint_every`` steps and at the end, a stop request
    honoured after a checkpoint, and the registration of what the run produced.

    A loop reads::

        training = TrainingRun(job_dir, config, state, reporter, save, resumed=own_checkpoint)
        training.begin()
        while training.running:
            if training.stopped(reporter.stop_requested):
                return EXIT_STOPPED
            training.start_step(optimizer)
            ...  # forward, backward, optimizer.step()
            training.end_step(loss)
        ...  # evaluation and export; training.register(kind, path) for each file
        training.register_checkpoint()
        return training.finish(metrics, "stage 1")

    Parameters
    ----------
    job_dir : Path
        The job's directory; artifacts are registered by their path inside it.
    config : TrainConfigBase
        Gives ``steps``, ``checkpoint_every``, ``batch_size`` and the learning-rate schedule.
    state : TrainState
        The run's state; :meth:`end_step` advances it.
    reporter : Reporter
        Where progress, checkpoint and finished events go.
    save : callable
        Writes a checkpoint of the current state and returns its path, or ``None`` on a
        data-parallel rank that does not write.
    resumed : Path or None
        The job's own checkpoint the run resumed from: it counts as saved at ``state.step``.
        ``None`` for a fresh start, and for a start from another job's checkpoint, which is not
        this job's to register (nor are its best weights here: the best is searched afresh).
    publish_paused : bool
        Register the checkpoint as an artifact when a pause stops the run, so that the paused
        run can be moved to another machine (a stage whose jobs resume from ``checkpoint_artifact``).
    validate : callable or None
        The validation loss of the current weights (``None`` when there is no validation data),
        measured every ``config.eval_every`` steps and at the last; ``None`` skips evaluation.
    save_best : callable or None
        Writes the current weights as the best at the given step (:func:`save_best_weights`;
        ``None`` on a rank that does not write).
    """

    def __init__(self, job_dir: Path, config: TrainConfigBase, state: TrainState, reporter: Reporter,
                 save: Callable[[], Path | None], resumed: Path | None, publish_paused: bool = False,
                 validate: Callable[[], float | None] | None = None,
                 save_best: Callable[[int], Path | None] | None = None) -> None:
        self.job_dir, self.config, self.state, self.reporter = job_dir, config, state, reporter
        self._write, self._publish_paused = save, publish_paused
        self._validate, self._save_best = validate, save_best
        self._checkpoint = resumed  # the newest checkpoint of this job's own, if any
        self._saved_step = state.step if resumed is not None else -1
        self._lr, self._started = 0.0, 0.0
        self.stop_reason: str | None = None
        """Why the run stopped early (patience ran out), or ``None``."""
        if state.best_step >= 0 and (resumed is None or not best_weights_path(job_dir, state.best_step).is_file()):
            # Another job's checkpoint (its best weights are in its own directory), or a best file
            # lost: the search for the best starts afresh from this state.
            state.best_step, state.best_val_loss, state.evals_since_best = -1, None, 0
        elif save_best is not None:
            prune_best_weights(job_dir, state.best_step)  # newer files are of steps this run redoes

    @property
    def running(self) -> bool:
        """Whether the loop goes on: steps are left and patience has not run out."""
        return self.state.step < self.config.steps and self.stop_reason is None

    def begin(self) -> None:
        """Report the step the loop starts from (a resumed run's), with heartbeats from here on."""
        self.reporter.update(step=self.state.step, total=self.config.steps)
        self.reporter.start_heartbeats()

    def _save(self) -> None:
        """Write a checkpoint of the current step and report it."""
        path = self._write()
        if path is not None:
            self.reporter.event("checkpoint", step=self.state.step, message=str(path.relative_to(self.job_dir)))
            if self.state.best_step >= 0:  # this checkpoint names its best: older best files can go
                prune_best_weights(self.job_dir, self.state.best_step)
        self._checkpoint, self._saved_step = path, self.state.step

    def stopped(self, request: str | None) -> bool:
        """Whether ``request`` (a pause or cancel, or ``None``) ends the loop here; it has then
        checkpointed the current step, unless that step is saved already."""
        if not request:
            return False
        if self._saved_step != self.state.step:
            self._save()
        if self._publish_paused and request == "pause" and self._checkpoint is not None:
            self.register(ArtifactKind.checkpoint, self._checkpoint)
        log.info("stopping at step %d (%s requested)", self.state.step, request)
        return True

    def start_step(self, optimizer: torch.optim.Optimizer | FusedOptimizer) -> None:
        """Start the step's clock, set its learning rate and clear the gradients."""
        self._started = time.perf_counter()
        self._lr = lr_at(self.state.step, self.config)
        for group in optimizer.param_groups:
            group["lr"] = self._lr
        optimizer.zero_grad(set_to_none=True)

    def end_step(self, loss: float) -> None:
        """Count the step and report it; measure the validation loss every ``eval_every`` steps
        and at the last; checkpoint every ``checkpoint_every`` steps, at the last and when
        stopping early (so the checkpoint holds the evaluation's outcome)."""
        self.state.step += 1
        self.state.record(loss)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self.reporter.update(step=self.state.step, loss=loss, lr=self._lr, samples_per_s=self.config.batch_size / elapsed)
        last = self.state.step == self.config.steps
        if self._validate is not None and (self.state.step % self.config.eval_every == 0 or last):
            self._evaluate()
        if self.state.step % self.config.checkpoint_every == 0 or last or self.stop_reason:
            self._save()

    def _evaluate(self) -> None:
        """Validation loss now: a new best saves its weights; ``patience`` evaluations without one
        stop the run (``stop_reason``)."""
        value = self._validate()
        if value is None:  # no validation data: the last state is the final one
            return
        state = self.state
        if state.best_val_loss is None or value < state.best_val_loss:
            state.best_step, state.best_val_loss, state.evals_since_best = state.step, value, 0
            if self._save_best is not None:
                self._save_best(state.step)
        else:
            state.evals_since_best += 1
        self.reporter.event("log", step=state.step, metrics={"val_loss": value},
                            message=f"validation loss {value:.4f} at step {state.step} "
                                    f"(best {state.best_val_loss:.4f} at step {state.best_step})")
        patience = self.config.patience
        if patience and state.evals_since_best >= patience and state.step < self.config.steps:
            self.stop_reason = (f"Stopped early at step {state.step} of {self.config.steps}: the validation loss has "
                                f"not improved for {patience} evaluations ({patience * self.config.eval_every} "
                                f"steps; patience {patience}); the final model is the best state, validation loss "
                                f"{state.best_val_loss:.4f} at step {state.best_step}.")
            self.reporter.update(total=state.step)  # the run is complete here: progress reads 100%
            self.reporter.event("log", step=state.step, message=self.stop_reason)
            log.info("%s", self.stop_reason)

    def best_summary(self) -> dict[str, Any]:
        """The final metrics' part about the best state and early stopping."""
        return {"best_step": self.state.best_step if self.state.best_step >= 0 else None,
                "best_val_loss": self.state.best_val_loss, "stopped_early": self.stop_reason is not None}

    def register(self, kind: ArtifactKind, path: Path) -> None:
        """Register a file the run wrote in its job directory as an artifact."""
        self.reporter.register(kind, str(path.relative_to(self.job_dir)))

    def register_checkpoint(self) -> None:
        """Register the newest checkpoint: the run's own, else the newest the job directory holds."""
        path = self._checkpoint or ckpt.find_latest_checkpoint(self.job_dir)
        if path is not None:
            self.register(ArtifactKind.checkpoint, path)

    def finish(self, metrics: dict[str, Any], label: str) -> int:
        """Send the ``finished`` event with the final ``metrics``; returns the exit code."""
        self.reporter.event("finished", step=self.state.step, loss=metrics["train_loss"], metrics=metrics)
        log.info("%s finished: %s", label, metrics)
        return EXIT_OK
