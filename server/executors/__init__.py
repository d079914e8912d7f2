"""Executors by name: the ``NEUROLENS_EXECUTOR`` setting picks one (default ``local``).

Adding an executor is one module here with an :class:`~server.executors.base.Executor`
subclass, one entry in :data:`EXECUTORS`, and its settings in :mod:`server.settings`.
"""

from __future__ import annotations

from server.executors.base import Executor
from server.executors.local import LocalExecutor
from server.executors.slurm import SlurmExecutor
from server.settings import Settings

EXECUTORS: dict[str, type[Executor]] = {LocalExecutor.name: LocalExecutor, SlurmExecutor.name: SlurmExecutor}


def make_executor(settings: Settings) -> Executor:
    """The executor ``settings.executor`` names.

    Raises
    ------
    ValueError
        For a name no executor has; the message lists the ones there are.
    """
    try:
        executor = EXECUTORS[settings.executor]
    except KeyError:
        raise ValueError(f"Invalid executor {settings.executor!r} (NEUROLENS_EXECUTOR); expected one of "
                         f"{', '.join(repr(name) for name in EXECUTORS)}.") from None
    return executor(settings)
