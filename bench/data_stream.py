"""The text pipeline's speed and memory: writes a folder of --mb MB of .jsonl (English-like rows
from tests/fixtures.py) in a temporary folder, then streams it from its start through
peer.tasks.text.PackedStream with the byte tokenizer (and with --bpe, a BPE tokenizer trained
here) and prints tokens/s, MB/s of files and the peak RSS. Not a test.

    .venv/bin/python bench/data_stream.py [--mb 500] [--files 8] [--seq-len 1024] [--batch-size 16]
                                          [--bpe] [--bpe-vocab 2048] [--max-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.tasks.text import ByteTokenizer, TextData, load_tokenizer  # noqa: E402
from tests.fixtures import corpus_texts, train_tokenizer  # noqa: E402


def write_corpus(folder: Path, total_mb: int, files: int) -> tuple[int, int]:
    """files .jsonl of about total_mb MB together, the same number of rows each; (rows a file, bytes)."""
    paragraphs = corpus_texts(4000, seed=7)
    row_bytes = sum(len(json.dumps({"text": p, "id": 0})) + 1 for p in paragraphs) / len(paragraphs)
    rows = int(total_mb * 1e6 / files / row_bytes)
    for f in range(files):
        with open(folder / f"part-{f:03d}.jsonl", "w") as out:
            for r in range(rows):
                out.write(json.dumps({"text": paragraphs[(f * 7919 + r) % len(paragraphs)], "id": r}) + "\n")
    return rows, sum(p.stat().st_size for p in folder.iterdir())


class PeakRss:
    """The process's largest RSS, sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stream_once(folder: Path, tokenizer, args, rows_per_file: int, total_bytes: int) -> None:
    """From the data's start until the epoch ends or --max-seconds pass; prints the figures."""
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with PeakRss() as rss:
        data = TextData(str(folder), "text", tokenizer, args.seq_len)
        stream = data.train_stream(args.batch_size, "bench")
        stream.load_state_dict({"epoch": 0, "file": 0, "example": 0, "token": 0,
                                "fingerprint": stream.fingerprint})
        setup_s = time.perf_counter() - t0
        t1, batches = time.perf_counter(), 0
        while time.perf_counter() - t1 < args.max_seconds:
            stream.next_batch()
            batches += 1
            if stream.state_dict()["epoch"] > 0:
                break
        elapsed = time.perf_counter() - t1
    state = stream.state_dict()
    rows_read = args.files * rows_per_file if state["epoch"] else state["file"] * rows_per_file + state["example"]
    mb_read = total_bytes * rows_read / (args.files * rows_per_file) / 1e6
    tokens = batches * args.batch_size * args.seq_len
    print(f"{tokenizer.name:>8}: {mb_read:7.1f} MB of files in {elapsed:6.1f} s: {tokens / elapsed / 1e6:6.2f} M tokens/s, "
          f"{mb_read / elapsed:6.1f} MB/s, {mb_read * 1e6 / tokens:.2f} bytes/token; setup {setup_s:.1f} s; "
          f"RSS {rss_before / 2**20:.0f} MiB before, peak {rss.peak / 2**20:.0f} MiB "
          f"(+{(rss.peak - rss_before) / 2**20:.0f}){'' if state['epoch'] else '; stopped at --max-seconds'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bpe", action="store_true", help="also stream with a BPE tokenizer trained here")
    parser.add_argument("--bpe-vocab", type=int, default=2048)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per tokenizer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="data-stream-") as tmp:
        folder = Path(tmp, "data")
        folder.mkdir()
        t0 = time.perf_counter()
        rows, total = write_corpus(folder, args.mb, args.files)
        print(f"wrote {args.files} files, {total / 1e6:.0f} MB, {rows} rows each in {time.perf_counter() - t0:.1f} s; "
              f"seq_len {args.seq_len}, batch {args.batch_size}")
        stream_once(folder, ByteTokenizer(), args, rows, total)
        if args.bpe:
            tok_dir = train_tokenizer(Path(tmp, "bpe"), corpus_texts(2000, seed=7), vocab_size=args.bpe_vocab)
            stream_once(folder, load_tokenizer(str(tok_dir)), args, rows, total)


if __name__ == "__main__":
    main()
