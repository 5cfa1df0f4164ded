"""peer.net.wire: shard chunks written and read without protobuf copies are still ordinary ShardChunk
protobuf both ways (any peer or tool reads them), the data a view of what arrived, and bytes that do
not parse are protobuf's DecodeError (which peer.net.auth refuses with INVALID_ARGUMENT)."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from peer._proto import peer_pb2 as pb
from peer.net import wire

HEADER = pb.ShardHeader(round=7, roster_hash="ab" * 32, sender="peer-a", shard=2, codec="fp32", numel=3,
                        num_bytes=12, sha256="cd" * 32)


@pytest.mark.parametrize("header, data, mac", [
    (HEADER, b"", b""),                           # a stream's first message: the header alone
    (None, bytes(range(256)) * 9, b""),           # a data chunk
    (None, b"\x00" * 5, b"m" * 32),               # a private run's chunk with its MAC
    (HEADER, b"xyz", b"m" * 32),
])
def test_a_chunk_is_protobufs_bytes_both_ways(header, data, mac):
    fields = pb.ShardChunk(mac=mac) if header is None else pb.ShardChunk(header=header, mac=mac)
    out = wire.OutChunk(fields, memoryview(data))
    plain = pb.ShardChunk(data=data, mac=mac, **({} if header is None else {"header": header}))
    assert pb.ShardChunk.FromString(out.SerializeToString()) == plain
    got = wire.parse_chunk(plain.SerializeToString())
    assert bytes(got.data) == data and got.mac == mac and got.HasField("header") == (header is not None)
    assert got.HasField("data") == bool(data)
    if header is not None:
        assert got.header == header
    assert got.data.readonly


def test_bytes_that_do_not_parse_are_a_decode_error():
    rng = random.Random(5)
    bad = [b"\xae", b"\x0f", b"\x12\x05ab", b"\x1a\xff\xff\xff\xff\x0f", b"\x13"]   # varint, wire type, lengths
    bad += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    refused = 0
    for raw in bad:
        try:
            chunk = wire.parse_chunk(raw)
        except DecodeError:
            refused += 1
            continue
        # what parses here must parse as protobuf too, to the same fields
        assert pb.ShardChunk.FromString(raw).data == bytes(chunk.data)
    assert refused >= 5
