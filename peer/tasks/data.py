"""Training bytes: the corpus with its fixed held-out part, resumable batch streams, eval windows.

numpy and CPU tensors only; never touches the model, the device or the network.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

MIN_CORPUS_BYTES = 8 * 1024
"""Smallest usable corpus: a few windows of the largest preset's block, after the held-out cut."""
HELDOUT_FRACTION = 0.02
HELDOUT_MIN_BYTES = 1024
HELDOUT_MAX_PIECES = 10
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

Batch = tuple[torch.Tensor, torch.Tensor]


class ByteCorpus:
    """One uint8 array split once into `train` and `heldout`.

    Held-out rule: the corpus is cut into up to 10 equal stripes (one per 4 KiB of held-out
    data, at least one) and the last bytes of each stripe are held out, 2 % of the corpus in
    all (at least 1 KiB). The cut depends only on the corpus length, so it is the same on
    every peer that loads the same bytes; `digest` lets peers check that they do.
    """

    def __init__(self, data: np.ndarray, name: str) -> None:
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"corpus {name}: expected a 1-d uint8 array, got {data.dtype} {data.shape}")
        if len(data) < MIN_CORPUS_BYTES:
            raise ValueError(f"corpus {name}: {len(data)} bytes, need at least {MIN_CORPUS_BYTES}")
        self.name = name
        self.digest = hashlib.sha256(data.tobytes()).hexdigest()[:16]
        heldout_mask = _heldout_mask(len(data))
        self.train: np.ndarray = data[~heldout_mask]
        self.heldout: np.ndarray = data[heldout_mask]

    @classmethod
    def load(cls, path: str | None, max_bytes: int = 16 * 2**20) -> ByteCorpus:
        """None: this Python's stdlib .py files; a file: its bytes; a directory: its files, sorted.

        Reads at most max_bytes (the last file is cut). Hidden files and directories are skipped.
        """
        if path is None:
            root = Path(sysconfig.get_paths()["stdlib"])
            files = _sorted_files(root, suffix=".py", skip_dirs=_STDLIB_SKIP_DIRS)
            name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
        else:
            root = Path(path)
            if not root.exists():
                raise ValueError(f"corpus path {path!r} does not exist")
            files = [root] if root.is_file() else _sorted_files(root)
            name = root.resolve().name or str(root)
        data = _read_concatenated(files, max_bytes)
        if len(data) < MIN_CORPUS_BYTES:
            where = path if path is not None else f"the stdlib at {root}"
            raise ValueError(f"corpus {where!r} holds {len(data)} bytes, need at least {MIN_CORPUS_BYTES}")
        return cls(data, name)

    def unigram_entropy_nats(self) -> float:
        """Entropy of the held-out byte frequencies: the loss of a model that knows nothing else."""
        counts = np.bincount(self.heldout, minlength=256)
        p = counts[counts > 0] / len(self.heldout)
        return float(-(p * np.log(p)).sum())

    def __repr__(self) -> str:
        return f"ByteCorpus({self.name}, train={len(self.train)} B, heldout={len(self.heldout)} B, {self.digest})"


def _heldout_mask(n_bytes: int) -> np.ndarray:
    heldout_bytes = max(int(n_bytes * HELDOUT_FRACTION), HELDOUT_MIN_BYTES)
    pieces = max(1, min(HELDOUT_MAX_PIECES, heldout_bytes // 4096))
    piece_bytes, stripe_bytes = heldout_bytes // pieces, n_bytes // pieces
    mask = np.zeros(n_bytes, dtype=bool)
    for i in range(pieces):
        end = n_bytes if i == pieces - 1 else (i + 1) * stripe_bytes
        mask[end - piece_bytes : end] = True
    return mask


def _sorted_files(root: Path, suffix: str = "", skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under root ending in suffix, sorted by relative path; hidden names skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for f in filenames:
            full = Path(dirpath, f)
            if f.endswith(suffix) and not f.startswith(".") and full.is_file():
                found.append((full.relative_to(root).as_posix(), full))
    return [full for _, full in sorted(found)]


def _read_concatenated(files: list[Path], max_bytes: int) -> np.ndarray:
    chunks, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        chunk = f.read_bytes()[: max_bytes - total]
        chunks.append(chunk)
        total += len(chunk)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def start_position(corpus_len: int, peer_key: str) -> int:
    """A deterministic offset in [0, corpus_len) for a peer: sha256(peer_key) mod corpus_len."""
    if corpus_len <= 0:
        raise ValueError(f"corpus_len must be positive, got {corpus_len}")
    return int.from_bytes(hashlib.sha256(peer_key.encode()).digest()[:8], "big") % corpus_len


class BatchStream:
    """Resumable batches of consecutive windows, wrapping around the end of `train`.

    Row r of each batch reads at position + r * (len(train) // batch_size), so one batch samples
    batch_size far-apart parts of the corpus; every batch moves all rows on by seq_len bytes.
    The whole state is `position`.
    """

    def __init__(self, train: np.ndarray, batch_size: int, seq_len: int, start: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if len(train) < seq_len + 1:
            raise ValueError(f"{len(train)} training bytes cannot fill a window of seq_len+1 = {seq_len + 1}")
        self.train, self.batch_size, self.seq_len = train, batch_size, seq_len
        self._row_offsets = np.arange(batch_size, dtype=np.int64)[:, None] * (len(train) // batch_size)
        self._window = np.arange(seq_len + 1, dtype=np.int64)[None, :]
        self._position = start % len(train)

    @property
    def position(self) -> int:
        return self._position

    def next_batch(self) -> Batch:
        """(x, y): int64 CPU tensors [batch_size, seq_len], y = x shifted left by one byte."""
        idx = (self._position + self._row_offsets + self._window) % len(self.train)
        self._position = (self._position + self.seq_len) % len(self.train)
        return _split_windows(self.train[idx])

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position, "train_bytes": len(self.train)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["train_bytes"]) != len(self.train):
            raise ValueError(
                f"data state was saved for {state['train_bytes']} training bytes, this corpus has {len(self.train)}"
            )
        self._position = int(state["position"]) % len(self.train)


def eval_batches(heldout: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
    """Fixed evenly spaced held-out windows (non-overlapping while they fit), the same on every peer.

    The last batch may be smaller than batch_size.
    """
    if batch_size < 1 or seq_len < 1 or max_batches < 1:
        raise ValueError(
            f"batch_size, seq_len, max_batches must be positive: {batch_size}, {seq_len}, {max_batches}"
        )
    last_start = len(heldout) - seq_len - 1
    if last_start < 0:
        raise ValueError(f"{len(heldout)} held-out bytes cannot fill a window of seq_len+1 = {seq_len + 1}")
    count = min(max_batches * batch_size, (len(heldout) - 1) // seq_len)
    starts = np.arange(count, dtype=np.int64) * last_start // max(count - 1, 1)  # integer math: exact
    windows = heldout[starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]]
    return [_split_windows(windows[i : i + batch_size]) for i in range(0, count, batch_size)]


def _split_windows(windows: np.ndarray) -> Batch:
    t = torch.from_numpy(windows.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
