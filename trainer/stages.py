"""The stage registry: every kind of training job, in the one table that everyone reads.

The trainer's entry point runs a job by its stage's runner; the server validates a new job by
what its stage needs (:func:`server.jobs.create_job`) and admits it by the same
(:mod:`server.scheduler`); ``GET /api/presets`` lists the registry, and the dashboard's forms
fill themselves from that listing. Adding a stage is one :class:`Stage` in :data:`STAGES`, its
config class in :mod:`trainer.config`, its runner module, and its memory prediction in
:mod:`trainer.memory_prediction`.

Torch-free, like :mod:`trainer.config`: the server imports it. A runner is named by its module
path and imported only when the trainer runs a job.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from trainer.config import ConfigError, Stage1Config, Stage2Config, TrainConfigBase, expect_choice

if TYPE_CHECKING:  # the runner's argument types; importing them here would pull in torch
    from trainer.distributed import World
    from trainer.protocol import JobSpec
    from trainer.reporter import Reporter

    Runner = Callable[[JobSpec, TrainConfigBase, Reporter, World], int]


@dataclass(frozen=True)
class Stage:
    """One kind of training job: what it is called, configured with, runs, needs and makes."""

    name: str
    """A job's ``stage``, e.g. 'stage1'."""
    title: str
    """Its name for people, e.g. 'Stage 1'."""
    description: str
    """What a job of this stage does, in one line."""
    config: type[TrainConfigBase]
    """Its config class; a job's ``preset`` names one of ``config.PRESET_NAMES``."""
    runner: str
    """``module:function`` of its training loop, called as ``run(spec, config, reporter, world)``
    and returning the trainer's exit code (:mod:`trainer.protocol`)."""
    needs_encoder: bool = False
    """A job starts from an encoder: it names exactly one of ``after`` (a job of a stage that
    produces an encoder; the job waits for it to succeed) or ``encoder_artifact``."""
    resumable: bool = False
    """A job may start from ``checkpoint_artifact``, a checkpoint another job of this stage wrote
    (on any machine), and train on to its own ``steps``."""
    produces: tuple[str, ...] = ()
    """Kinds of artifact (:class:`trainer.protocol.ArtifactKind` values) a finished job registers."""

    @property
    def presets(self) -> tuple[str, ...]:
        return self.config.PRESET_NAMES

    def load_runner(self) -> Runner:
        """Import the runner (the trainer's side only: runners need torch)."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage(name="stage1", title="Stage 1", description="Train the EEG encoder by self-supervision (no text needed)",
          config=Stage1Config, runner="trainer.stage1:run", resumable=True,
          produces=("encoder", "checkpoint")),
    Stage(name="stage2", title="Stage 2",
          description="Train BART on a frozen encoder's features to write the sentence read",
          config=Stage2Config, runner="trainer.stage2:run", needs_encoder=True,
          produces=("model", "report", "checkpoint")),
)}


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``; :class:`ConfigError` naming the registered ones otherwise."""
    expect_choice("stage", name, tuple(STAGES))
    return STAGES[name]


def stage_names(where: Callable[[Stage], bool]) -> str:
    """The names of the stages ``where`` holds for, as a message says them: 'stage1' or
    'stage1 or stage3'."""
    return " or ".join(stage.name for stage in STAGES.values() if where(stage))


def parse_config(stage: str, data: dict[str, Any] | None) -> TrainConfigBase:
    """Build the config for ``stage`` from a job's JSON config, refusing unknown keys."""
    cls = get_stage(stage).config
    data = dict(data or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown config key {unknown[0]!r} for {stage}; expected some of: {', '.join(known)}."
        )
    try:
        return cls(**data)
    except TypeError as exc:  # e.g. a list where a number belongs, caught by a comparison
        raise ConfigError(f"Invalid config for {stage}: {exc}") from exc
