"""Text training data: files streamed with `datasets`, tokenized, packed into windows, resumable.

Owns packing, the held-out cut and the stream's position; reads files only through
peer/tasks/text_files.py and encodes through peer/tasks/tokenizer.py (whose names it re-exports);
never loads a whole file, never touches the model or the network.

Packing (nanoGPT): each example's tokens, then the tokenizer's end-of-text id, follow each other in
one endless token sequence: the files in this peer's order, then again (the next epoch). A window
is seq_len+1 consecutive tokens, x = window[:-1], y = window[1:]; consecutive windows advance by
seq_len tokens and a batch is batch_size consecutive windows. An example is a .jsonl/.json line or
a .parquet row (its `text_field`), or a line of a .txt file: a .txt file is one document, its lines
tokenized one by one and one end-of-text after its last line.

Held-out slice (no --eval-data): the first HELDOUT_WINDOWS windows of the data in sorted file order
from its very start, and every whole example they touch, are never trained on. It depends on the
files, the tokenizer and seq_len only, so it is the same on every peer whatever its key or batch size.

Where a peer starts (deterministic): d = sha256(peer_key); the file order is the sorted files
shuffled by random.Random(d[0:8]); the stream starts in the first file of that order with training
examples (past the held-out ones), at its training example h % n, h = d[8:16], n = its training
examples counted up to START_COUNT_CAP. So even a single file starts every peer somewhere else.

Position: `PackedStream.state_dict()` = {epoch, file (index into the order), example (row in that
file), token (offset into that example's tokens, its end-of-text included), fingerprint}. The
fingerprint hashes the files' paths and sizes, text_field, tokenizer, seq_len, held-out cut and
order seed, so a position is never applied to other data. Resuming re-reads the example (skipping
the rows before it in its file) and drops `token` tokens: the batches are exactly the same.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from peer.tasks.base import TaskError
from peer.tasks.text_files import DataError, DataFile, count_rows, list_files, read_rows, validate
from peer.tasks.tokenizer import (
    TOKENIZER_FILES,
    ByteTokenizer,
    HFTokenizer,
    encode,
    load_tokenizer,
    tokenizer_hash,
)

__all__ = [
    "HELDOUT_WINDOWS",
    "TOKENIZER_FILES",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "PackedStream",
    "TextData",
    "load_tokenizer",
    "text_streams",
    "tokenizer_hash",
]

HELDOUT_WINDOWS = 128
MIN_TRAIN_WINDOWS = 4
"""Windows of training data needed at least, past the held-out slice."""
START_COUNT_CAP = 10_000
STATE_KEYS = ("epoch", "file", "example", "token", "fingerprint")

Batch = tuple[torch.Tensor, torch.Tensor]


class TextData:
    """The files of one --data path, checked, with their held-out cut (`heldout`: False when the
    caller holds out other data, or when this is the eval data)."""

    def __init__(self, path: str, text_field: str, tokenizer, seq_len: int, *, heldout: bool = True) -> None:
        if seq_len < 1:
            raise TaskError(f"seq_len must be positive, got {seq_len}")
        if not text_field:
            raise TaskError("text_field must name the field that holds the text")
        self.path, self.text_field, self.tokenizer, self.seq_len = path, text_field, tokenizer, seq_len
        self.heldout = heldout
        self.files: list[DataFile] = list_files(path)
        for f in self.files:
            validate(f, text_field)
        self._cut = (0, 0)  # training reads sorted file cut[0] from row cut[1] on, and every file after it
        self._heldout_windows = np.zeros((0, seq_len + 1), np.int32)
        self._train_checked = False
        if heldout:
            self._cut_heldout()

    def describe(self) -> str:
        kinds = ", ".join(sorted({f.suffix for f in self.files}))
        count = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        size = _human_bytes(sum(f.size for f in self.files))
        return f"{self.path}: {count} ({kinds}), {size}, tokenizer {self.tokenizer.name}"

    def train_stream(self, batch_size: int, peer_key: str) -> PackedStream:
        """This peer's endless batches: its file order and start from peer_key, held-out examples skipped."""
        if batch_size < 1:
            raise TaskError(f"batch_size must be positive, got {batch_size}")
        if not self._train_checked:
            self._check_train_tokens()
        digest = hashlib.sha256(peer_key.encode()).digest()
        seed, h = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")
        order = list(range(len(self.files)))
        random.Random(seed).shuffle(order)
        file, example = self._peer_start(order, h)
        return PackedStream(self, batch_size, order, file, example, self._fingerprint(seed))

    def eval_batches(self, batch_size: int, max_batches: int) -> list[Batch]:
        """The held-out windows (at most HELDOUT_WINDOWS), or without a held-out cut the data's first
        windows, batch_size at a time (the last batch may be smaller); the same on every peer."""
        if max_batches <= 0:
            return []
        if batch_size < 1:
            raise TaskError(f"batch_size must be positive, got {batch_size}")
        if self.heldout:
            windows = self._heldout_windows[: min(HELDOUT_WINDOWS, max_batches * batch_size)]
        else:
            windows = self._first_windows(max_batches * batch_size)
        return [_split(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]

    # reading

    def _examples(self, s: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """(row, tokens with its end-of-text) of sorted file s from row `start` on."""
        f = self.files[s]
        eot = np.array([self.tokenizer.eot_id], np.int32)
        one_document = f.suffix == ".txt"
        held: tuple[int, np.ndarray] | None = None
        row = start
        for texts in read_rows(f, self.text_field, start):
            for tokens in encode(self.tokenizer, texts):
                if not one_document:
                    yield row, np.concatenate([tokens, eot])
                else:  # the end-of-text goes after the file's last line only
                    if held is not None:
                        yield held
                    held = (row, tokens)
                row += 1
        if held is not None:
            yield held[0], np.concatenate([held[1], eot])

    def _sorted_examples(self, file: int = 0, row: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """(file, row, tokens) in sorted file order from (file, row), one pass."""
        for s in range(file, len(self.files)):
            for r, tokens in self._examples(s, row if s == file else 0):
                yield s, r, tokens

    def _train_examples(self, order: list[int], epoch: int, file: int, row: int
                       ) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(epoch, file in order, row, tokens) of the training examples from that position on, endless."""
        while True:
            found = False
            for p in range(file, len(order)):
                first = self._first_train_row(order[p])
                if first is None:
                    continue
                for r, tokens in self._examples(order[p], max(first, row) if p == file else first):
                    found = True
                    yield epoch, p, r, tokens
            if not found and file == 0 and row == 0:
                raise DataError(f"{self.path}: no training examples (all of them are held out)")
            epoch, file, row = epoch + 1, 0, 0

    def _first_train_row(self, s: int) -> int | None:
        cut_file, cut_row = self._cut
        return None if s < cut_file else cut_row if s == cut_file else 0

    # the held-out cut and the size checks

    def _cut_heldout(self) -> None:
        need = HELDOUT_WINDOWS * self.seq_len + 1
        need_train = MIN_TRAIN_WINDOWS * self.seq_len + 1
        pieces, held, train = [], 0, 0
        for s, r, tokens in self._sorted_examples():
            if held < need:
                pieces.append(tokens)
                held += len(tokens)
                self._cut = (s, r + 1)
            else:
                train += len(tokens)
                if train >= need_train:
                    break
        else:
            raise DataError(
                f"{self.path}: too little data: {held + train} tokens ({self.tokenizer.name} tokenizer); the "
                f"held-out slice takes {need} tokens ({HELDOUT_WINDOWS} windows of seq_len {self.seq_len}, and "
                f"the whole examples they touch) and training needs at least {need_train} more "
                f"({MIN_TRAIN_WINDOWS} windows): give more data, a smaller seq_len, or separate eval data")
        self._heldout_windows = _windows(np.concatenate(pieces)[:need], self.seq_len)
        self._train_checked = True

    def _check_train_tokens(self) -> None:
        need = MIN_TRAIN_WINDOWS * self.seq_len + 1
        total = 0
        for _, _, tokens in self._sorted_examples(*self._cut):
            total += len(tokens)
            if total >= need:
                self._train_checked = True
                return
        raise DataError(f"{self.path}: too little data: {total} tokens ({self.tokenizer.name} tokenizer), "
                        f"training needs at least {need} ({MIN_TRAIN_WINDOWS} windows of seq_len {self.seq_len})")

    def _first_windows(self, count: int) -> np.ndarray:
        need = count * self.seq_len + 1
        pieces, total = [], 0
        for _, _, tokens in self._sorted_examples():
            pieces.append(tokens)
            total += len(tokens)
            if total >= need:
                break
        if total < self.seq_len + 1:
            raise DataError(f"{self.path}: too little data: {total} tokens ({self.tokenizer.name} "
                            f"tokenizer), one eval window needs seq_len+1 = {self.seq_len + 1}")
        return _windows(np.concatenate(pieces)[:need], self.seq_len)

    def _peer_start(self, order: list[int], h: int) -> tuple[int, int]:
        for p, s in enumerate(order):
            first = self._first_train_row(s)
            if first is None:
                continue
            n = count_rows(self.files[s], self.text_field, first, START_COUNT_CAP)
            if n:
                return p, first + h % n
        raise DataError(f"{self.path}: no training examples (all of them are held out)")

    def _fingerprint(self, seed: int) -> int:
        payload = json.dumps({
            "files": [[f.rel, f.size] for f in self.files], "text_field": self.text_field,
            "tokenizer": self.tokenizer.hash, "seq_len": self.seq_len, "heldout": self.heldout, "seed": seed,
        })
        return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big") >> 2


class PackedStream:
    """Endless batches of consecutive windows of a peer's training examples (see the module's
    docstring); implements peer.tasks.base.BatchStream. `order` lists sorted file indices."""

    def __init__(self, data: TextData, batch_size: int, order: list[int], file: int, example: int,
                 fingerprint: int) -> None:
        self.data, self.batch_size, self.seq_len, self.order = data, batch_size, data.seq_len, order
        self.fingerprint = fingerprint
        self._position = (0, file, example, 0)  # epoch, file, example, token: the stream's next token
        self._pending: deque[list] = deque()  # [epoch, file, example, tokens, offset], read ahead
        self._pending_tokens = 0
        self._reader: Iterator[tuple[int, int, int, np.ndarray]] | None = None

    def next_batch(self) -> Batch:
        """(x, y): int64 CPU tensors [batch_size, seq_len], y = x shifted left by one token."""
        span = self.batch_size * self.seq_len
        self._fill(span + 1)  # the last window's target, and the position after the batch
        tokens = np.concatenate([p[3][p[4]:] for p in self._pending])[: span + 1]
        self._consume(span)
        return _split(_windows(tokens, self.seq_len))

    def state_dict(self) -> dict[str, int]:
        if self._pending:
            epoch, file, example, _, token = self._pending[0]
            self._position = (epoch, file, example, token)
        epoch, file, example, token = self._position
        return {"epoch": epoch, "file": file, "example": example, "token": token, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"data position {dict(state)} lacks {', '.join(missing)}")
        if int(state["fingerprint"]) != self.fingerprint:
            raise DataError(
                f"data position from the checkpoint does not fit this data (fingerprint {state['fingerprint']}, "
                f"this data's is {self.fingerprint}): the data changed since the checkpoint (its files or their "
                "sizes, the text field, the tokenizer, seq_len, the held-out data or the peer key)")
        epoch, file, example, token = (int(state[k]) for k in STATE_KEYS[:4])
        if min(epoch, file, example, token) < 0 or file >= len(self.order):
            raise DataError(f"data position {dict(state)} is outside this data ({len(self.order)} files)")
        self._close()
        self._position = (epoch, file, example, token)

    def _fill(self, need: int) -> None:
        if self._reader is None:
            self._reader = self._open_reader()
        while self._pending_tokens < need:
            epoch, file, example, tokens = next(self._reader)
            self._pending.append([epoch, file, example, tokens, 0])
            self._pending_tokens += len(tokens)

    def _open_reader(self) -> Iterator[tuple[int, int, int, np.ndarray]]:
        epoch, file, example, token = self._position
        reader = self.data._train_examples(self.order, epoch, file, example)
        if token:  # resuming inside an example: it must be the one saved
            first = next(reader)
            if first[:3] != (epoch, file, example) or token >= len(first[3]):
                raise DataError(f"data position {self._position} is not in this data: the data changed since "
                                "the checkpoint")
            self._pending.append([*first, token])
            self._pending_tokens += len(first[3]) - token
        return reader

    def _consume(self, count: int) -> None:
        self._pending_tokens -= count
        while count:
            head = self._pending[0]
            left = len(head[3]) - head[4]
            if left > count:
                head[4] += count
                return
            count -= left
            self._pending.popleft()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()  # type: ignore[attr-defined]
        self._reader = None
        self._pending.clear()
        self._pending_tokens = 0


def text_streams(data: str, eval_data: str, text_field: str, tokenizer, seq_len: int, batch_size: int,
                 eval_batches: int, peer_key: str) -> tuple[PackedStream, list[Batch], str]:
    """The one entry point: this peer's training stream, the eval batches and a description.

    Without eval_data, the held-out slice is cut from data; with it, data is trained on whole and the
    eval batches are eval_data's first eval_batches * batch_size windows.
    """
    train = TextData(data, text_field, tokenizer, seq_len, heldout=not eval_data)
    description = train.describe()
    if eval_data:
        held = TextData(eval_data, text_field, tokenizer, seq_len, heldout=False)
        evals = held.eval_batches(batch_size, eval_batches)
        description += f"; eval data {held.describe()}"
    else:
        evals = train.eval_batches(batch_size, eval_batches)
        description += f"; held out: the first {HELDOUT_WINDOWS} windows"
    return train.train_stream(batch_size, peer_key), evals, description


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The windows of seq_len+1 tokens starting every seq_len tokens that fit in `tokens`."""
    count = (len(tokens) - 1) // seq_len
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:count]


def _split(windows: np.ndarray) -> Batch:
    t = torch.from_numpy(windows.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
