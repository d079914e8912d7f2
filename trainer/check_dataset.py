"""``python -m trainer.check_dataset``: can a job train on this dataset? Asked before it is queued.

The server runs this in a subprocess (it never imports MNE's readers, and a hostile file
cannot hang or crash it) with a time limit. It reads only headers: every recording the dataset
names is opened without loading its signal and its EEG channels are mapped onto the encoder's
by :func:`trainer.data.recordings.open_recording`, the same call the trainer makes, so what
passes here is what the trainer accepts.

    python -m trainer.check_dataset '{"dataset": "/data/zuco", "channels": ["Fz", ...]}'

Prints one JSON line, ``{"recordings": n}`` (exit 0) or ``{"error": "..."}`` (exit 2), the
message naming the file, the channels it has and the channels needed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from trainer.config import EncoderConfig
from trainer.data.recordings import open_recording, resolve_dataset
from trainer.exceptions import DatasetError
from trainer.protocol import EXIT_FAILED, EXIT_OK


def check(dataset: str, channels: list[str]) -> int:
    """Open every recording of ``dataset``; return how many there are, or raise DatasetError."""
    encoder = EncoderConfig(channels=tuple(channels))
    with tempfile.TemporaryDirectory() as scratch:  # only a synthetic dataset would be written there
        recordings = resolve_dataset(dataset, Path(scratch), encoder)
        for path in recordings:
            open_recording(path, encoder)
    return len(recordings)


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    try:
        found = check(request["dataset"], request["channels"])
    except DatasetError as exc:
        print(json.dumps({"error": str(exc)}))
        return EXIT_FAILED
    print(json.dumps({"recordings": found}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
