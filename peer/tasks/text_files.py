"""Text data files: which files a --data path names, their checks, and their rows read with `datasets`.

Streams every file, so memory stays bounded whatever the data's size; never tokenizes, never
touches the network. Every error is a DataError that names the file and the line (or row).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from peer.tasks.base import TaskError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""The file kinds read, by suffix, and the `datasets` builder that reads each."""
KINDS_ACCEPTED = ".txt, .jsonl, .json (JSON lines or one array) or .parquet"
VALIDATE_ROWS = 1000
"""Rows (lines) of every file checked before the peer joins; the rest are checked as they stream."""
READ_ROWS = 256
"""Rows per batch read from a file (and per tokenizer call)."""
CHUNK_BYTES = 4 << 20
"""Bytes `datasets` reads at a time from a .txt or .jsonl file (plus the end of the line)."""
JSON_ARRAY_MAX_BYTES = 64 << 20
"""A .json file holding one array is parsed whole (by pandas, in `datasets`); larger ones are refused."""


class DataError(TaskError):
    """Data that cannot be trained on; the message names the file and the line or row."""


@dataclass(frozen=True)
class DataFile:
    path: Path
    rel: str
    """Path relative to the --data folder (the file's name for a single file): sorts the files."""
    shown: str
    """How messages name it: the --data path joined with `rel`."""
    size: int

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()


def list_files(path: str) -> list[DataFile]:
    """The data files of a file or a folder (recursive, hidden names skipped), sorted by relative path."""
    root = Path(path)
    if not path or not root.exists():
        raise DataError(f"data {path!r}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() not in BUILDERS:
            raise DataError(f"data {path}: not a data file; expected {KINDS_ACCEPTED}, or a folder of them")
        return [DataFile(root, root.name, str(root), root.stat().st_size)]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            full = Path(dirpath, name)
            if not name.startswith(".") and full.suffix.lower() in BUILDERS and full.is_file():
                rel = full.relative_to(root).as_posix()
                found.append(DataFile(full, rel, str(root / rel), full.stat().st_size))
    if not found:
        raise DataError(f"data folder {path}: no usable file in it; expected {KINDS_ACCEPTED} files "
                        "(hidden names are skipped)")
    return sorted(found, key=lambda f: f.rel)


def validate(f: DataFile, text_field: str) -> None:
    """The file is not empty and its first VALIDATE_ROWS rows hold text; DataError otherwise."""
    if f.size == 0:
        raise DataError(f"{f.shown}: empty file (0 bytes)")
    problem, rows = scan(f, text_field, VALIDATE_ROWS)
    if problem:
        raise DataError(f"{f.shown} {problem}")
    if rows == 0:
        raise DataError(f"{f.shown}: no examples in it (only blank lines or no rows)")


def scan(f: DataFile, text_field: str, max_rows: int | None, good_rows: int = 0) -> tuple[str | None, int]:
    """The first problem in the file's first max_rows rows (None: all of them) as "line N: what"
    (":" for the whole file), or None; and the rows seen. Reads lines itself, not with `datasets`;
    the first good_rows rows of JSON lines, already read, are counted but not parsed again."""
    if f.suffix == ".txt":
        return _scan_txt(f.path, max_rows)
    if f.suffix == ".parquet":
        return _scan_parquet(f.path, text_field, max_rows)
    if f.suffix == ".json" and _starts_with(f.path, b"["):
        return _scan_json_array(f, text_field, max_rows)
    problem, rows = _scan_json_lines(f.path, text_field, max_rows, good_rows)
    if problem and problem.startswith("line 1:") and f.suffix == ".json":
        problem += "; a .json file must hold JSON lines or one array of objects"
    return problem, rows


def _scan_txt(path: Path, max_rows: int | None) -> tuple[str | None, int]:
    rows = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if max_rows is not None and rows >= max_rows:
                break
            rows += 1
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", rows
    return None, rows


def _scan_json_lines(path: Path, text_field: str, max_rows: int | None, good_rows: int = 0
                     ) -> tuple[str | None, int]:
    rows = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue  # datasets (pyarrow) skips blank lines too; they still count as lines
            if max_rows is not None and rows >= max_rows:
                break
            rows += 1
            if rows <= good_rows:
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                return f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", rows
            except json.JSONDecodeError as e:
                return f"line {number}: not valid JSON ({e.msg} at column {e.colno})", rows
            problem = _row_problem(row, text_field)
            if problem:
                return f"line {number}: {problem}", rows
    return None, rows


def _scan_json_array(f: DataFile, text_field: str, max_rows: int | None) -> tuple[str | None, int]:
    if f.size > JSON_ARRAY_MAX_BYTES:
        return (f": one JSON array of {f.size} bytes is read whole into memory, the limit is "
                f"{JSON_ARRAY_MAX_BYTES}; write it as JSON lines (.jsonl), one object per line"), 0
    try:
        text = f.path.read_bytes().decode("utf-8")
        rows = json.loads(text)
    except UnicodeDecodeError as e:
        return f": not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})", 0
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})", 0
    if not isinstance(rows, list):
        return ": a .json file must hold JSON lines or one array of objects", 0
    for i, row in enumerate(rows[:max_rows] if max_rows is not None else rows):
        problem = _row_problem(row, text_field)
        if problem:
            return f"line {_array_item_line(text, i)} (item {i + 1} of the array): {problem}", i + 1
    return None, len(rows) if max_rows is None else min(len(rows), max_rows)


def _array_item_line(text: str, item: int) -> int:
    """The line where item `item` of the JSON array `text` starts."""
    decoder, separators = json.JSONDecoder(), re.compile(r"[\s,]*")
    position = separators.match(text, text.index("[") + 1).end()
    for _ in range(item):
        position = separators.match(text, decoder.raw_decode(text, position)[1]).end()
    return text.count("\n", 0, position) + 1


def _row_problem(row: object, text_field: str) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {_json_type(row)}"
    if text_field not in row:
        fields = ", ".join(sorted(row)[:8]) or "none"
        return f"no field {text_field!r} (its fields: {fields}); choose the field with --text-field"
    if not isinstance(row[text_field], str):
        return f"field {text_field!r} is {_json_type(row[text_field])}, not a string"
    return None


def _json_type(value: object) -> str:
    for kind, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _scan_parquet(path: Path, text_field: str, max_rows: int | None) -> tuple[str | None, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return f": not a readable Parquet file ({e})", 0
    schema = pf.schema_arrow
    if text_field not in schema.names:
        return f"row 1: no field {text_field!r} (its columns: {', '.join(schema.names[:8])})", 0
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return f"row 1: field {text_field!r} is {kind}, not a string", 0
    rows = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        column = batch.column(0)
        if column.null_count:
            first_null = column.is_null().to_pylist().index(True)
            return f"row {rows + first_null + 1}: field {text_field!r} is null, not a string", rows + first_null
        rows += len(column)
        if max_rows is not None and rows >= max_rows:
            break
    return None, rows


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    return head.lstrip().startswith(prefix)


def read_rows(f: DataFile, text_field: str, start: int = 0) -> Iterator[list[str]]:
    """The file's texts from row `start` on, READ_ROWS at a time, streamed with `datasets`.

    A row of .txt is a line (with its line break); of .jsonl/.json/.parquet, a row's `text_field`.
    A read error or a row without text raises DataError at its line (found by `scan`).
    """
    index = start
    for column in _columns(f, text_field, start):
        texts = column.to_pylist()
        if not all(isinstance(t, str) for t in texts):
            raise _diagnose(f, text_field, None, index)
        index += len(texts)
        yield texts


def count_rows(f: DataFile, text_field: str, start: int, cap: int) -> int:
    """Rows of the file from `start` on, counted up to `cap` (bounded work, texts left in Arrow)."""
    total = 0
    for column in _columns(f, text_field, start):
        total += len(column)
        if total >= cap:
            return cap
    return total


def _columns(f: DataFile, text_field: str, start: int) -> Iterator:
    """The text column (pyarrow) of READ_ROWS rows at a time from row `start`; DataError at its line."""
    index = start
    try:
        dataset, column = _open(f, text_field)
        for table in dataset.skip(start).with_format("arrow").iter(batch_size=READ_ROWS):
            index += table.num_rows
            yield table.column(column)
    except Exception as e:  # datasets and pyarrow raise many kinds; none carries the line
        raise _diagnose(f, text_field, e, index) from e


def _diagnose(f: DataFile, text_field: str, error: Exception | None, row: int) -> DataError:
    problem, _ = scan(f, text_field, None, good_rows=row)
    if problem:
        return DataError(f"{f.shown} {problem}")
    cause = f"{type(error).__name__}: {error}" if error else "a row without text"
    return DataError(f"{f.shown}: cannot be read near row {row + 1} ({cause})")


def _open(f: DataFile, text_field: str):
    """A streaming `datasets.IterableDataset` of the file and the column that holds the text."""
    datasets = _datasets()
    builder = BUILDERS[f.suffix]
    if builder == "text":  # one row per line, line breaks kept: the lines join back into the file
        options: dict = {"keep_linebreaks": True, "chunksize": CHUNK_BYTES}
    elif builder == "json":  # mixed types raise (default: re-encoded as JSON strings, silently)
        options = {"on_mixed_types": None, "chunksize": CHUNK_BYTES}
    else:
        options = {"columns": [text_field]}
    dataset = datasets.load_dataset(builder, data_files=[str(f.path)], split="train", streaming=True,
                                     cache_dir=_private_cache_dir(), **options)
    if builder == "text":
        return dataset, "text"
    if builder == "json":
        dataset = dataset.select_columns([text_field])
    return dataset, text_field


_cache_dir: str | None = None


def _datasets():
    """`datasets`, imported offline and quiet (its own errors become DataErrors here)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _private_cache_dir() -> str:
    """Streaming caches nothing, but every builder leaves a lock file in its cache folder (one per
    file and run): they go to a folder of this process's, removed at exit."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = tempfile.mkdtemp(prefix="peer-datasets-")
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    return _cache_dir
