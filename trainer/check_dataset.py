"""``python -m trainer.check_dataset``: can a job train on this dataset? Asked before it is queued.

The server runs this in a subprocess (it never imports MNE's readers, and a hostile file
cannot hang or crash it) with a time limit. It reads only headers: every recording the dataset
names is opened without loading its signal and its EEG channels are mapped onto the encoder's
by :func:`trainer.data.recordings.open_recording`, the same call the trainer makes, so what
passes here is what the trainer accepts.

    python -m trainer.check_dataset '{"dataset": "/data/zuco", "channels": ["Fz", ...], "test_subjects": ["01"]}'

Prints one JSON line, ``{"recordings": n, "subjects": [...]}`` (exit 0) or ``{"error": "..."}``
(exit 2), the message naming the file, the channels it has and the channels needed. For a BIDS
root the success line also carries ``bids`` (:func:`trainer.data.bids.describe`: subjects,
sessions, tasks, runs, bad channels, participants columns) and ``summary``, one sentence of it
that the server writes into the new job's events. ``test_subjects`` (a job's
``split.test_subjects``), when given, must all be subjects of the dataset.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from trainer.config import EncoderConfig
from trainer.data import bids
from trainer.data.recordings import open_recording, resolve_dataset, subject_label
from trainer.data.text import check_test_subjects
from trainer.exceptions import DatasetError
from trainer.protocol import EXIT_FAILED, EXIT_OK


def check(dataset: str, channels: list[str], test_subjects: list[str] = ()) -> dict:
    """Open every recording of ``dataset`` and say what was found, or raise DatasetError."""
    encoder = EncoderConfig(channels=tuple(channels))
    with tempfile.TemporaryDirectory() as scratch:  # only a synthetic dataset would be written there
        recordings = resolve_dataset(dataset, Path(scratch), encoder)
        bads = {path.name: list(open_recording(path, encoder)[0].info["bads"]) for path in recordings}
    subjects = [subject_label(path) for path in recordings]
    check_test_subjects(list(test_subjects), subjects)
    found = {"recordings": len(recordings), "subjects": sorted({s for s in subjects if s is not None})}
    root = Path(dataset).expanduser()
    if bids.is_bids_root(root):
        found["bids"] = bids.describe(root, bads)
        found["summary"] = f"{len(recordings)} recordings. " + bids.summary(found["bids"])
    return found


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    try:
        found = check(request["dataset"], request["channels"], request.get("test_subjects") or [])
    except DatasetError as exc:
        print(json.dumps({"error": str(exc)}))
        return EXIT_FAILED
    print(json.dumps(found))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
