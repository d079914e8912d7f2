"""``python -m trainer.check_dataset``: can a job train on this dataset? Asked before it is queued.

The server runs this in a subprocess (it never imports MNE's readers, and a hostile file
cannot hang or crash it) with a time limit. It reads only headers: every recording the dataset
names is opened without loading its signal and its EEG channels are mapped onto the encoder's
by :func:`trainer.data.recordings.open_recording`, the same call the trainer makes, so what
passes here is what the trainer accepts. ZuCo files have no header apart from their signal:
their structure is read (sentences, texts, fixations), not their EEG.

    python -m trainer.check_dataset '{"dataset": "/data/zuco", "channels": ["Fz", ...], "test_subjects": ["01"]}'

Prints one JSON line (exit 0), what it found::

    {"recordings": 4, "layout": "zuco", "subjects": ["YAC", ...], "tasks": ["NR", "SR"],
     "sentences": 640, "sentences_without_eeg": null, "mapping": "8 of 8 channels by position ...",
     "channels": {"Fz": "interpolated from 104 electrodes (E11 0.93, ...; nearest E11, 4 mm)", ...}}

(``layout`` is ``"zuco"``, ``"bids"`` or ``"files"``; ``mapping`` and ``channels`` are the first
recording's, and ``mappings`` counts the recordings per mapping line), or ``{"error": "..."}``
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
from collections import Counter
from pathlib import Path

from trainer.config import EncoderConfig
from trainer.data import bids, zuco
from trainer.data.recordings import open_recording, resolve_dataset, subject_label
from trainer.data.text import check_test_subjects
from trainer.exceptions import DatasetError
from trainer.protocol import EXIT_FAILED, EXIT_OK


def check(dataset: str, channels: list[str], test_subjects: list[str] = ()) -> dict:
    """Open every recording of ``dataset``; say what was found, or raise DatasetError."""
    encoder = EncoderConfig(channels=tuple(channels))
    with tempfile.TemporaryDirectory() as scratch:  # only a synthetic dataset would be written there
        recordings = resolve_dataset(dataset, Path(scratch), encoder)
        mappings: Counter[str] = Counter()
        bads: dict[str, list[str]] = {}
        first = None
        for path in recordings:
            opened = open_recording(path, encoder, header_only=True)
            mappings[opened.channel_map.summary()] += 1
            bads[path.name] = list(opened.raw.info["bads"])
            first = first or opened.channel_map
        found: dict = {"recordings": len(recordings)}
        mat = [p for p in recordings if zuco.is_zuco_file(p)]
        found.update(zuco.describe_folder(mat) if mat else {"layout": "files"})
    subjects = [subject_label(path) for path in recordings]
    check_test_subjects(list(test_subjects), subjects)
    found.setdefault("subjects", sorted({s for s in subjects if s is not None}))
    root = Path(dataset).expanduser()
    if bids.is_bids_root(root):
        found["layout"] = "bids"
        found["bids"] = bids.describe(root, bads)
    if first is not None:
        found.update(mapping=first.summary(), channels=first.describe(), mappings=dict(mappings))
    found["summary"] = summary(found)
    return found


def summary(found: dict) -> str:
    """What the check found, as the sentence the server writes into the new job's first event."""
    text = f"{found['recordings']} recording{'s' if found['recordings'] != 1 else ''}. "
    if found["layout"] == "bids":
        text += bids.summary(found["bids"])
    elif found["layout"] == "zuco":
        without = found["sentences_without_eeg"]
        text += (f"ZuCo: {len(found['subjects'])} subjects ({', '.join(found['subjects'])}), tasks "
                 f"{', '.join(found['tasks'])}, {found['sentences']} sentences"
                 + (f" ({without} without EEG, skipped)" if without else "") + ".")
    elif found["subjects"]:
        text += f"Subjects: {', '.join(found['subjects'])}."
    if found.get("mappings"):
        text += " Channels: " + "; ".join(f"{line} ({n} recording{'s' if n != 1 else ''})"
                                          for line, n in found["mappings"].items()) + "."
    return text.strip()


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
