"""Checkpoint files (global state, inner optimizer, data position, residuals): atomic save, checked load.
Pure: imports nothing of peer.net and never pickles; never half-loads a damaged file nor deletes one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peer.feedback import check_flat_residual
from peer.outer import GlobalState

log = logging.getLogger(__name__)

MAGIC, VERSION, MAX_HEADER_BYTES = b"DILOCOCK", 1, 256 << 20
_PREAMBLE = struct.Struct("<8sIQ")  # magic, format version, JSON header length: 20 bytes
_DIGEST_BYTES, _ALIGN = 32, 64  # trailing sha256 of all before it; tensor offsets are multiples of _ALIGN
_DTYPES = {str(d)[6:]: d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
_FIELDS = {"run_id": str, "spec_hash": str, "peer_id": str, "round": int, "global_samples": int,
           "theta": torch.Tensor, "momentum": torch.Tensor, "optimizer": dict, "data": dict,
           "residuals": dict, "owner_residuals": dict, "spec": dict, "assets": dict}
_OPTIONAL = {"spec": {}, "assets": {}}  # fields files written before them lack
_NAME = re.compile(r"round-(\d+)\.ckpt")


class CheckpointError(ValueError):
    """A file that is not a whole, intact checkpoint: truncated, corrupted, or another format."""


@dataclass
class Checkpoint:
    """What a restarted peer needs to resume. Its tensors must not change while it is being saved."""

    state: GlobalState
    run_id: str
    spec_hash: str  # a checkpoint only resumes the run and spec it was made for
    peer_id: str
    optimizer: dict  # the inner optimizer's state_dict(), restored exactly (tuples, int keys and all)
    data: dict[str, int]  # where this peer's data stream stands
    residuals: dict  # ErrorFeedback.state_dict() of this peer's sends: {} or {"residual": float32 of theta's numel}
    owner_residuals: dict  # the same for its re-encoding of the shards it owns
    spec: dict = dataclasses.field(default_factory=dict)  # the run spec's record: what `peer export` rebuilds
    assets: dict = dataclasses.field(default_factory=dict)  # str -> str: where this peer's model and tokenizer were


def save(path: str | Path, ckpt: Checkpoint, midway: Callable[[], None] | None = None) -> int:
    """Write ckpt to path atomically (temp file, fsync, rename, fsync the directory); returns bytes written.
    `midway` runs when the header is written and the tensors are not (a test kills the process there)."""
    if sys.byteorder != "little":
        raise NotImplementedError("checkpoint files are little-endian; this machine is not")
    path, s = Path(path), ckpt.state
    fields = {"run_id": ckpt.run_id, "spec_hash": ckpt.spec_hash, "peer_id": ckpt.peer_id, "round": s.round,
              "global_samples": s.global_samples, "theta": s.theta, "momentum": s.momentum}
    fields |= {key: getattr(ckpt, key) for key in ("optimizer", "data", "residuals", "owner_residuals", "spec",
                                                   "assets")}
    found: list[tuple[str, torch.Tensor]] = []
    header: dict[str, Any] = {key: _encode(value, key, found) for key, value in fields.items()}
    table, chunks, end = [], [], 0
    for name, t in found:
        if t.dtype not in _DTYPES.values():
            raise TypeError(f"{name}: cannot checkpoint dtype {t.dtype}")
        blob = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        chunks += [bytes(-end % _ALIGN), blob]  # zero padding up to the tensor's aligned offset
        table.append({"name": name, "dtype": str(t.dtype)[6:], "shape": list(t.shape),
                      "offset": end + -end % _ALIGN, "length": blob.nbytes})
        end = table[-1]["offset"] + blob.nbytes
    header |= {"tensors": table, "data_bytes": end}
    head = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    head += b" " * (-(_PREAMBLE.size + len(head)) % _ALIGN)  # the data section starts aligned too
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            digest = hashlib.sha256()
            for i, chunk in enumerate([_PREAMBLE.pack(MAGIC, VERSION, len(head)) + head, *chunks]):
                digest.update(chunk)
                f.write(chunk)
                if i == 0 and midway is not None:
                    f.flush()
                    midway()
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)
    return _PREAMBLE.size + len(head) + end + _DIGEST_BYTES


def load(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint; CheckpointError naming the file and the fault unless it is intact.
    The returned tensors share one buffer the size of the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            num_read = f.readinto(buf)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e}") from e
    if num_read != len(buf):
        raise CheckpointError(f"{path}: read {num_read} of {len(buf)} bytes; it changed while being read")
    return _parse(path, buf)


def checkpoint_path(directory: str | Path, round: int) -> Path:
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    return Path(directory) / f"round-{round:08d}.ckpt"


def save_round(directory: str | Path, ckpt: Checkpoint, keep: int = 3, midway: Callable[[], None] | None = None
               ) -> Path:
    """Save ckpt as directory/round-N.ckpt; delete stray temp files and this run's valid checkpoints beyond
    the newest keep (the one just written always stays). Other runs' files and damaged files stay, but a
    file of the same round is replaced whatever its run: give each run its own directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    Path(directory).mkdir(parents=True, exist_ok=True)
    written = checkpoint_path(directory, ckpt.state.round)
    save(written, ckpt, midway)
    for tmp in Path(directory).glob(".round-*.ckpt.*.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("%s: deleted a stray temp file (a save that never finished)", tmp)
    kept = 0
    for round_, path in _rounds(directory):
        other = ckpt if path == written else _try_load(path, round_)
        if other is not None and (other.run_id, other.spec_hash) == (ckpt.run_id, ckpt.spec_hash):
            kept += 1
            if kept > keep and path != written:
                path.unlink()
                log.info("%s: deleted; the %d newest checkpoints of this run are kept", path, keep)
    return written


def latest(directory: str | Path, run_id: str | None = None, spec_hash: str | None = None) -> Checkpoint | None:
    """The highest-round checkpoint in directory that loads cleanly and matches run_id / spec_hash where
    given, or None. Damaged files are skipped with a warning and left on disk."""
    for round_, path in _rounds(directory):
        ckpt = _try_load(path, round_)
        if ckpt is not None and run_id in (None, ckpt.run_id) and spec_hash in (None, ckpt.spec_hash):
            return ckpt
        if ckpt is not None:
            log.info("%s: run %s spec %s, not run %s spec %s; passed over",
                     path, ckpt.run_id, ckpt.spec_hash, run_id, spec_hash)
    return None


def _rounds(directory: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of the checkpoint files in directory, newest first."""
    found = [(int(m[1]), p) for p in Path(directory).glob("round-*.ckpt") if (m := _NAME.fullmatch(p.name))]
    return sorted(found, key=lambda rp: rp[0], reverse=True)


def _try_load(path: Path, round_: int) -> Checkpoint | None:
    try:
        ckpt = load(path)
        if ckpt.state.round != round_:
            raise CheckpointError(f"{path}: holds round {ckpt.state.round}, but its name says {round_}")
        return ckpt
    except CheckpointError as e:
        log.warning("%s; skipped, left on disk", e)
        return None


def _encode(obj: Any, name: str, found: list[tuple[str, torch.Tensor]]) -> Any:
    """obj as exactly restorable JSON: a tensor becomes {"tensor": name} (appended to found); tuples,
    dicts (keys of any scalar or tuple type) and non-finite floats are tagged."""
    if isinstance(obj, torch.Tensor):
        name += f"#{len(found)}" if any(name == seen for seen, _ in found) else ""  # names are unique
        found.append((name, obj))
        return {"tensor": name}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", found) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"tuple": items}
    if isinstance(obj, dict):
        tensor_keys: list[tuple[str, torch.Tensor]] = []
        pairs = [[_encode(k, name, tensor_keys), _encode(v, f"{name}/{k!r}", found)] for k, v in obj.items()]
        if not tensor_keys:
            return {"dict": pairs}
    raise TypeError(f"{name}: cannot checkpoint a {type(obj).__name__} (or a dict with tensor keys)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    tag, value = next(iter(node.items())) if isinstance(node, dict) and len(node) == 1 else (None, None)
    if tag == "tensor" and isinstance(value, str) and value in tensors:
        return tensors[value]
    if tag == "tuple" and isinstance(value, list):
        return tuple(_decode(v, tensors) for v in value)
    if tag == "float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if tag == "dict" and isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in value):
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    raise ValueError(f"cannot decode {json.dumps(node)[:100]}")


def _parse(path: Path, buf: bytearray) -> Checkpoint:
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}")

    if len(buf) < _PREAMBLE.size:
        raise fail(f"truncated: {len(buf)} bytes, less than the {_PREAMBLE.size}-byte preamble")
    magic, version, header_len = _PREAMBLE.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise fail(f"not a version {VERSION} checkpoint: starts {bytes(magic)!r} version {version}")
    data_start = _PREAMBLE.size + header_len
    if header_len > MAX_HEADER_BYTES or len(buf) < data_start + _DIGEST_BYTES:
        raise fail(f"truncated or corrupt: {len(buf)} bytes, but it claims a {header_len}-byte header")
    try:
        header = json.loads(buf[_PREAMBLE.size : data_start])
        data_bytes = header["data_bytes"]
        if not _is_int(data_bytes) or data_bytes < 0:
            raise ValueError(f"data_bytes is {data_bytes!r}")
    except (ValueError, TypeError, KeyError) as e:
        raise fail(f"header is not checkpoint JSON ({type(e).__name__}: {str(e)[:200]}); corrupted") from e
    expected = data_start + data_bytes + _DIGEST_BYTES
    if len(buf) < expected:
        raise fail(f"truncated: {len(buf)} of {expected} bytes (a crash cut it off?)")
    if len(buf) > expected:
        raise fail(f"{len(buf) - expected} bytes too long: {len(buf)}, its header says {expected}; corrupted")
    stored, actual = bytes(buf[-_DIGEST_BYTES:]), hashlib.sha256(memoryview(buf)[:-_DIGEST_BYTES]).digest()
    if stored != actual:
        raise fail(f"sha256 mismatch: stored {stored.hex()[:16]}.., content {actual.hex()[:16]}..; corrupted")
    try:
        tensors = _tensors(header["tensors"], torch.frombuffer(buf, dtype=torch.uint8), data_start, data_bytes)
        values = {key: _decode(header[key], tensors) if key in header or key not in _OPTIONAL
                  else dict(_OPTIONAL[key]) for key in _FIELDS}
        _upgrade_keyed_residuals(path, values)
        _check_fields(values)
    except (ValueError, TypeError, KeyError) as e:
        raise fail(f"bad header: {e}") from e
    state = GlobalState(*(values.pop(k) for k in ("theta", "momentum", "round", "global_samples")))
    return Checkpoint(state=state, **values)


def _tensors(table: list, raw: torch.Tensor, data_start: int, data_bytes: int) -> dict[str, torch.Tensor]:
    """The tensors the table names, as views of raw (copies where an offset is not aligned)."""
    out: dict[str, torch.Tensor] = {}
    for entry in table:
        name, dtype, shape = entry["name"], _DTYPES.get(entry["dtype"]), entry["shape"]
        offset, length = entry["offset"], entry["length"]
        if dtype is None or not all(_is_int(v) and v >= 0 for v in (offset, length, *shape)) or name in out:
            raise ValueError(f"tensor entry {json.dumps(entry)[:200]} is malformed or a duplicate")
        if length != math.prod(shape) * dtype.itemsize or offset + length > data_bytes:
            raise ValueError(f"tensor {name!r}: {dtype} {shape} at bytes {offset}..{offset + length} does "
                             f"not fit its length or the {data_bytes}-byte data section")
        view = raw[data_start + offset : data_start + offset + length]
        out[name] = (view.clone() if (data_start + offset) % dtype.itemsize else view).view(dtype).reshape(shape)
    return out


def _check_fields(v: dict[str, Any]) -> None:
    """ValueError unless the decoded fields have the types Checkpoint promises."""
    wrong = [k for k, kind in _FIELDS.items() if not isinstance(v[k], kind) or isinstance(v[k], bool)]
    if not wrong:
        theta, momentum = v["theta"], v["momentum"]
        flat = theta.dtype == momentum.dtype == torch.float32 and theta.dim() == 1 and momentum.shape == theta.shape
        wrong += [] if flat else ["theta/momentum (1-D float32 of one length)"]
        wrong += [] if all(isinstance(k, str) and _is_int(n) for k, n in v["data"].items()) else ["data (str: int)"]
        wrong += [] if all(isinstance(k, str) and isinstance(n, str) for k, n in v["assets"].items()) else [
            "assets (str: str)"]
        faults = {k: _residual_fault(v[k], theta.numel()) for k in ("residuals", "owner_residuals")}
        wrong += [f"{k} ({why})" for k, why in faults.items() if why]
    if wrong:
        raise ValueError(f"fields of the wrong type: {', '.join(wrong)}")


def _residual_fault(state: dict, numel: int) -> str:
    """Why state is not {} or {"residual": a finite 1-D float32 tensor of numel values} ("" when it is)."""
    if set(state) - {"residual"}:
        return f"keys {sorted(map(repr, state))[:4]}, expected only 'residual'"
    try:
        if state:
            check_flat_residual(state["residual"], numel)
    except ValueError as e:
        return str(e)
    return ""


def _upgrade_keyed_residuals(path: Path, v: dict[str, Any]) -> None:
    """Residuals of the format before flat ones, one tensor per shard range ever used ({(start, end): t},
    {("owner", start, end): t}), become one flat residual: each tensor added in at its range. Nothing
    is lost: every stored tensor is error not yet fed back (a range of another group size was never
    re-added), so their sum is what this peer still owes. Only dicts whose keys all end in two ints."""
    numel = v["theta"].numel() if isinstance(v["theta"], torch.Tensor) else None
    for key in ("residuals", "owner_residuals"):
        old = v[key]
        if numel is None or not isinstance(old, dict) or not old or not all(_is_range_key(k) for k in old):
            continue
        flat = torch.zeros(numel, dtype=torch.float32)
        for k, r in old.items():
            start, end = k[-2:]
            if not 0 <= start <= end <= numel:
                raise ValueError(f"{key}: range {k!r} is outside the model's {numel} values")
            check_flat_residual(r, end - start)
            flat[start:end] = torch.add(flat[start:end], r)
        v[key] = {"residual": flat}
        log.warning("%s: %s held %d keyed residuals (the format before flat ones); added them into one "
                    "flat residual at their ranges", path, key, len(old))


def _is_range_key(k: Any) -> bool:
    return isinstance(k, tuple) and len(k) >= 2 and _is_int(k[-2]) and _is_int(k[-1])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
