"""Peak memory of reading a ZuCo task folder: 12 subjects against one.

Writes a task folder of ``--subjects`` ZuCo-layout results files (``trainer.data.zuco_writer``,
``--version`` 7.3 as ZuCo 2.0 or 5 as ZuCo 1.0, ``--sentences`` each), then, each in a fresh
process, runs what a job runs (:func:`trainer.data.recordings.load_dataset`: read, preprocess,
cache) on a folder holding one of the files and on the whole folder, and prints each process's
peak RSS (``VmHWM``; and that of a process that only imports) beside one file's size and
one subject's signal in memory. Reading the folder reads one subject's file at a time, so the
two peaks should be about equal.

    .venv/bin/python bench/zuco_memory.py            # --subjects 12 --sentences 120 --version 7.3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MB = 2**20
SUBJECTS = ("ZAB", "ZDM", "ZDN", "ZGW", "ZJM", "ZJN", "ZJS", "ZKB", "ZKH", "ZKW", "ZMG", "ZPH",
            "YAC", "YAG", "YAK", "YDG", "YDR", "YFR")


def child(dataset: str, cache: str) -> None:
    from trainer.config import EncoderConfig
    from trainer.data.recordings import load_dataset

    start = time.perf_counter()
    # "-": imports only, the floor the other two stand on.
    recordings = load_dataset(dataset, Path(cache), EncoderConfig.from_name("small")) if dataset != "-" else []
    print(json.dumps({"recordings": len(recordings), "seconds": time.perf_counter() - start,
                      "peak_rss_bytes": peak_rss_bytes()}))


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, which starts afresh at exec (``ru_maxrss`` carries the
    parent's peak over fork and exec on Linux, so it would report this script's own peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(dataset: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(dataset), str(cache)], capture_output=True,
                         text=True, check=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--version", choices=("5", "7.3"), default="7.3")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from trainer.data import zuco
    from trainer.data.zuco_writer import write_task

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "task1 - NR" / "Matlab files"
        start = time.perf_counter()
        paths = write_task(folder, "NR", args.version, SUBJECTS[:args.subjects], seed=0, null=False,
                           n_sentences=args.sentences)
        print(f"wrote {len(paths)} v{args.version} files of {args.sentences} sentences in "
              f"{time.perf_counter() - start:.0f} s, {paths[0].stat().st_size / MB:.0f} MiB each")
        one = Path(tmp) / "one"
        one.mkdir()
        (one / paths[0].name).symlink_to(paths[0])
        signal = zuco.read_zuco(paths[0]).raw.get_data().nbytes
        print(f"one subject's signal in memory (105 channels, float64): {signal / MB:.0f} MiB")
        for label, dataset in (("imports", "-"), ("1 subject", one), (f"{len(paths)} subjects", folder.parent)):
            result = measure(dataset, Path(tmp) / f"cache-{label.split()[0]}")
            print(f"{label:>12}: peak RSS {result['peak_rss_bytes'] / MB:.0f} MiB "
                  f"({result['recordings']} recordings read and cached in {result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
