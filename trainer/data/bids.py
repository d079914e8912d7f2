"""BIDS datasets through mne-bids: enumerate, read with the sidecars, describe.

A dataset folder holding ``dataset_description.json`` is a BIDS root. Its recordings are the
EEG files mne-bids finds in it (:func:`mne_bids.find_matching_paths`: every subject, session,
task and run, ``derivatives/`` and ``sourcedata/`` left out), never a glob of our own, so a
layout mne-bids accepts is one we read. Each is opened by :func:`mne_bids.read_raw_bids`, which
applies the sidecars: ``*_channels.tsv`` status ``bad`` marks channels bad (the preprocessing
then leaves them out), ``*_electrodes.tsv`` with its ``*_coordsystem.json`` becomes the raw's
montage (so channels can be mapped by position), ``*_events.tsv`` becomes its annotations.
Sentence and word text is still read from ``*_events.tsv`` by :mod:`trainer.data.text`.
``participants.tsv`` is read for the subject labels and its columns, which the submission-time
check reports.

Every failure of mne-bids (a malformed sidecar, a root with nothing in it) becomes a
:class:`~trainer.exceptions.DatasetError` naming the file, so a submission gets a 422 with the
reason, never a 500.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import mne
import mne_bids

from trainer.exceptions import DatasetError, RecordingError

DESCRIPTION = "dataset_description.json"
PARTICIPANTS = "participants.tsv"
_SUBJECT = re.compile(r"(?:^|_)sub-([A-Za-z0-9]+)(?=_|\.|$)")


def is_bids_root(path: Path) -> bool:
    """Whether ``path`` is a folder with a ``dataset_description.json`` (the mark of a BIDS root)."""
    return path.is_dir() and (path / DESCRIPTION).is_file()


def bids_root_of(path: Path) -> Path | None:
    """The BIDS root a recording file lies in (``<root>/sub-*/.../file``), or ``None``."""
    for parent in path.parents:
        if is_bids_root(parent):
            return parent if path.relative_to(parent).parts[0].startswith("sub-") else None
    return None


def subject_of(path: Path) -> str | None:
    """The subject label of a file named the BIDS way (``sub-01_task-x_eeg.edf`` -> ``'01'``)."""
    match = _SUBJECT.search(path.name)
    return match.group(1) if match else None


def _check_description(root: Path) -> None:
    try:
        description = json.loads((root / DESCRIPTION).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{root / DESCRIPTION} is not valid JSON ({exc}); a BIDS root needs a readable "
                           f"dataset_description.json.") from exc
    if not isinstance(description, dict):
        raise DatasetError(f"{root / DESCRIPTION} holds {type(description).__name__}; expected a JSON object "
                           f"(with at least 'Name' and 'BIDSVersion').")


def find_recordings(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Every EEG recording of a BIDS root, as mne-bids enumerates them (sorted paths).

    Raises
    ------
    DatasetError
        ``dataset_description.json`` is malformed, or mne-bids finds no EEG recording.
    """
    _check_description(root)
    try:
        found = mne_bids.find_matching_paths(root, datatypes="eeg", suffixes="eeg", extensions=list(extensions),
                                             ignore_nosub=True)
    except Exception as exc:  # mne-bids raises ValueError, RuntimeError, ... for odd layouts
        raise DatasetError(f"mne-bids cannot enumerate the BIDS dataset {root}: {exc}") from exc
    # find_matching_paths walks the whole tree; derivatives and source data are not recordings.
    paths = sorted({Path(p.fpath) for p in found
                    if Path(p.fpath).relative_to(root).parts[0].startswith("sub-") and Path(p.fpath).is_file()})
    if not paths:
        raise DatasetError(f"{root} is a BIDS dataset (it has {DESCRIPTION}) but mne-bids found no EEG recording in "
                           f"it: expected sub-<label>/[ses-<label>/]eeg/sub-<label>_..._eeg with one of "
                           f"{', '.join(extensions)}.")
    return paths


def read_raw(path: Path) -> mne.io.BaseRaw:
    """Open a recording of a BIDS dataset with :func:`mne_bids.read_raw_bids` (no signal is loaded).

    Raises
    ------
    RecordingError
        The file or one of its sidecars cannot be read; the message names the file and the reason.
    """
    try:
        bids_path = mne_bids.get_bids_path_from_fname(path, verbose="error")
    except Exception as exc:
        raise RecordingError(f"Cannot read BIDS recording {path}: its name is not a BIDS file name ({exc}).") from exc
    _check_channels_tsv(Path(bids_path.copy().update(suffix="channels", extension=".tsv").fpath))
    read_participants(Path(bids_path.root))  # read_raw_bids reads it too, and fails on a bad one with a bare KeyError
    try:
        return mne_bids.read_raw_bids(bids_path, verbose="error")
    except Exception as exc:  # a malformed channels.tsv, electrodes.tsv or events.tsv: all "unreadable"
        raise RecordingError(f"Cannot read BIDS recording {path} with its sidecars: {exc}") from exc


CHANNEL_COLUMNS = ("name", "type", "units")
"""The columns BIDS requires in ``*_channels.tsv``."""
CHANNEL_STATUS = ("good", "bad", "n/a")


def _check_channels_tsv(tsv: Path) -> None:
    """Refuse a ``channels.tsv`` that mne-bids would pass over with a mere warning: without the
    required columns, or with a status other than good / bad, the bad channels it should name
    would silently be trained on."""
    if not tsv.is_file():
        return
    try:
        with open(tsv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecordingError(f"Cannot read {tsv}: {exc}") from exc
    missing = [c for c in CHANNEL_COLUMNS if c not in columns]
    if missing:
        raise RecordingError(f"{tsv} lacks the column(s) {', '.join(missing)} (its columns: "
                             f"{', '.join(columns) or 'none'}); BIDS requires {', '.join(CHANNEL_COLUMNS)}.")
    for line, row in enumerate(rows, start=2):
        status = (row.get("status") or "n/a").strip().lower()
        if status not in CHANNEL_STATUS:
            raise RecordingError(f"{tsv} line {line}: status {row.get('status')!r} for channel {row.get('name')!r}; "
                                 f"expected one of {', '.join(CHANNEL_STATUS)}.")


def sidecar_stamps(path: Path) -> list[list]:
    """Name, size and modification time of the sidecars beside a BIDS recording, for cache keys:
    marking a channel bad in ``channels.tsv`` changes what preprocessing produces."""
    out = []
    for sidecar in sorted(path.parent.iterdir()):
        if sidecar.suffix in (".tsv", ".json") and sidecar.is_file():
            stat = sidecar.stat()
            out.append([sidecar.name, stat.st_size, stat.st_mtime_ns])
    return out


def read_participants(root: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """``participants.tsv``: its columns (``participant_id`` first) and one row per subject label.

    An absent file is no error (BIDS recommends it, does not require it): no columns, no rows.

    Raises
    ------
    DatasetError
        The file cannot be read or has no ``participant_id`` column.
    """
    tsv = root / PARTICIPANTS
    if not tsv.is_file():
        return [], {}
    try:
        with open(tsv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"Cannot read {tsv}: {exc}") from exc
    if "participant_id" not in columns:
        raise DatasetError(f"{tsv} has no participant_id column (its columns: {', '.join(columns) or 'none'}); "
                           f"BIDS names each subject there as sub-<label>.")
    by_subject = {}
    for row in rows:
        label = (row.get("participant_id") or "").strip()
        by_subject[label.removeprefix("sub-")] = {k: v for k, v in row.items() if k != "participant_id"}
    return columns, by_subject


def describe(root: Path, bads: dict[str, list[str]]) -> dict:
    """What a BIDS dataset holds, for the submission-time check.

    Parameters
    ----------
    root : Path
        The BIDS root.
    bads : dict
        Recording file name -> channels its ``channels.tsv`` marks bad (from the opened raws).

    Returns
    -------
    dict
        ``subjects``, ``sessions``, ``tasks``, ``runs`` (mne-bids' entity values), ``bad_channels``
        (only recordings with some), ``participants`` (``columns``, ``count``, and the labels
        ``without_recordings`` or ``not_listed`` there).
    """
    try:
        entities = {f"{key}s": mne_bids.get_entity_vals(root, key) for key in ("subject", "session", "task", "run")}
    except Exception as exc:
        raise DatasetError(f"mne-bids cannot list the entities of {root}: {exc}") from exc
    columns, rows = read_participants(root)
    listed = {"columns": [c for c in columns if c != "participant_id"], "count": len(rows),
              # A subject in one of the two but not the other is usually a typo in participants.tsv.
              "without_recordings": sorted(set(rows) - set(entities["subjects"])),
              "not_listed": sorted(set(entities["subjects"]) - set(rows)) if rows else []}
    return {**entities, "bad_channels": {name: channels for name, channels in bads.items() if channels},
            "participants": listed}


def summary(report: dict) -> str:
    """:func:`describe`'s report as one sentence for the job's events."""
    def listed(key: str) -> str:
        values = report[key]
        return f"{len(values)} {key if len(values) > 1 else key[:-1]} ({', '.join(values)})" if values else f"no {key}"

    bads = "; ".join(f"{name}: {', '.join(ch)}" for name, ch in report["bad_channels"].items()) or "none"
    people = report["participants"]
    participants = (f"{people['count']} rows, columns {', '.join(people['columns']) or 'participant_id only'}"
                    if people["count"] else "absent")
    if people["without_recordings"]:
        participants += f", listing subjects without recordings: {', '.join(people['without_recordings'])}"
    if people["not_listed"]:
        participants += f", not listing subjects {', '.join(people['not_listed'])}"
    return (f"BIDS dataset: {listed('subjects')}, {listed('sessions')}, {listed('tasks')}, {listed('runs')}; "
            f"bad channels (left out): {bads}; participants.tsv: {participants}.")
