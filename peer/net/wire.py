"""The bulk bytes of shard streams (Contribute and GetShard's ShardChunk messages) without protobuf
copies: an outgoing chunk is serialized as its small fields plus the data field appended from a
view of the payload; an incoming one is parsed into its small fields and a view of the data inside
the received message. The bytes on the wire are ordinary ShardChunk protobuf, so any peer or tool
reads them. Pure; no net state.

Why: through protobuf, a 1 MiB chunk's data was copied four times on the way out (a slice of the
payload, the message's own copy, serialization, gRPC's copy into its buffer) and three times on
the way in (gRPC's bytes, the parsed message's copy, reading `.data`, the copy into the payload).
gRPC's own copy and the kernel's stay; this keeps one copy each side besides them."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from peer._proto import peer_pb2 as pb

DATA_FIELD = pb.ShardChunk.DESCRIPTOR.fields_by_name["data"].number
_LEN = 2   # protobuf wire type of length-delimited fields (bytes, strings, messages)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, at: int) -> tuple[int, int]:
    """The varint at `at` and the offset after it; DecodeError when it runs past the end or is too long."""
    value, shift = 0, 0
    while True:
        if at >= len(buf) or shift > 63:
            raise DecodeError("malformed ShardChunk: a varint runs past the message")
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, at
        shift += 7


_DATA_TAG = _varint(DATA_FIELD << 3 | _LEN)


class OutChunk:
    """A ShardChunk to send: `fields` holds every field but data (the header, and whatever else a
    later version adds), `data` a view of the payload that is copied once, into the serialized bytes."""

    __slots__ = ("fields", "data")

    def __init__(self, fields: pb.ShardChunk, data: memoryview | bytes):
        self.fields, self.data = fields, data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fields, name)
    @property
    def mac(self) -> bytes:   # a private run's chunk MAC (peer.net.chunkmac), a small field like the header
        return self.fields.mac

    @mac.setter
    def mac(self, value: bytes) -> None:
        self.fields.mac = value

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf method name gRPC and peer.net.auth call)
        head = self.fields.SerializeToString()
        if not len(self.data):
            return head
        return b"".join((head, _DATA_TAG, _varint(len(self.data)), self.data))


class InChunk:
    """A received ShardChunk: its fields but data parsed by protobuf (`fields`), `data` a read-only view
    of the received message (kept alive by the view)."""

    __slots__ = ("fields", "data")

    def __init__(self, fields: pb.ShardChunk, data: memoryview):
        self.fields, self.data = fields, data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fields, name)

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        return len(self.data) > 0 if name == "data" else self.fields.HasField(name)


def serialize(message: Any) -> bytes:
    """gRPC's serializer for ShardChunk streams: an OutChunk, or any protobuf message."""
    return message.SerializeToString()


def parse_chunk(raw: bytes) -> InChunk:
    """gRPC's deserializer for ShardChunk streams: the data field (the last one, as protobuf
    takes it) as a view of `raw`, every other field through protobuf. DecodeError on a malformed
    message, as protobuf's own parser raises (peer.net.auth refuses it with INVALID_ARGUMENT)."""
    buf = memoryview(raw)
    data = buf[0:0]
    rest: list[memoryview] = []   # the other fields' bytes, in order
    at = 0
    while at < len(buf):
        start = at
        tag, at = _read_varint(buf, at)
        kind = tag & 7
        if kind == 0:
            _, at = _read_varint(buf, at)
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        elif kind == _LEN:
            size, at = _read_varint(buf, at)
            if tag >> 3 == DATA_FIELD:
                if at + size > len(buf):
                    raise DecodeError("malformed ShardChunk: its data runs past the message")
                data = buf[at:at + size]
                at += size
                continue
            at += size
        else:
            raise DecodeError(f"malformed ShardChunk: wire type {kind}")
        if at > len(buf):
            raise DecodeError("malformed ShardChunk: a field runs past the message")
        rest.append(buf[start:at])
    fields = pb.ShardChunk.FromString(b"".join(rest)) if rest else pb.ShardChunk()
    return InChunk(fields, data.toreadonly())
