"""Catch-up by replay: every peer keeps the averaged update bytes of its last few rounds; a
peer a few rounds behind fetches them and repeats the outer steps (the same bytes as the
swarm's, as the outer step is deterministic) instead of downloading the whole state."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict

import grpc
import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.net.chunkmac import OFF
from peer.net.client import CHUNK_BYTES, Channels, describe_rpc_error
from peer.net.loop import Deadline
from peer.net.state_sync import Received
from peer.outer import GlobalState, outer_step

log = logging.getLogger(__name__)
KEEP_ROUNDS = 4   # updates kept per peer; a peer further behind downloads the state


class UpdateLog:
    """The last KEEP_ROUNDS updates that led to this peer's state, as one unbroken chain. An
    update is kept as the reduced shards' payloads; their join and its sha256 are made when a
    peer first asks for it (most rounds nobody replays), then kept."""

    def __init__(self) -> None:
        self._rounds: OrderedDict[int, tuple[pb.UpdateHeader, list[bytes]]] = OrderedDict()

    def add(self, round_: int, applied: bool, codec: str, bounds: list[int], payloads: list[bytes],
            samples: int, digest_after: str) -> None:
        if self._rounds and next(reversed(self._rounds)) != round_ - 1:
            self._rounds.clear()  # the chain broke (we took a state from elsewhere)
        header = pb.UpdateHeader(round=round_, applied=applied, codec=codec, shard_bounds=bounds,
                                 shard_bytes=[len(p) for p in payloads], samples=samples,
                                 num_bytes=sum(len(p) for p in payloads), digest_after=digest_after)
        self._rounds[round_] = (header, list(payloads))
        while len(self._rounds) > KEEP_ROUNDS:
            self._rounds.popitem(last=False)

    def _update(self, round_: int) -> tuple[pb.UpdateHeader, bytes]:
        """Round r's header, its sha256 filled in, and its payload (joined once, then kept)."""
        header, payloads = self._rounds[round_]
        payload = bytes(payloads[0]) if len(payloads) == 1 else b"".join(payloads)   # a payload may be a view
        if not header.sha256:
            header.sha256 = hashlib.sha256(payload).hexdigest()
            self._rounds[round_] = (header, [payload])
        return header, payload

    def clear(self) -> None:
        self._rounds.clear()

    def span(self) -> str:
        return f"rounds {min(self._rounds)}..{max(self._rounds)}" if self._rounds else "no rounds"

    def chunks(self, from_round: int, to_round: int) -> list[pb.UpdateChunk] | None:
        """The stream for rounds from_round .. to_round-1, or None when some are not kept."""
        if to_round <= from_round or any(r not in self._rounds for r in range(from_round, to_round)):
            return None
        out = []
        for r in range(from_round, to_round):
            header, payload = self._update(r)
            out.append(pb.UpdateChunk(header=header, data=payload[:CHUNK_BYTES]))
            out += [pb.UpdateChunk(data=payload[i:i + CHUNK_BYTES]) for i in range(CHUNK_BYTES, len(payload), CHUNK_BYTES)]
        return out


def apply_update(state: GlobalState, header: pb.UpdateHeader, payload: bytes, lr: float, momentum: float
                 ) -> GlobalState:
    """Repeats one round's outer step; raises ValueError when anything does not check out."""
    if header.round != state.round:
        raise ValueError(f"update of round {header.round} does not follow the state of round {state.round}")
    if hashlib.sha256(payload).hexdigest() != header.sha256 or len(payload) != header.num_bytes:
        raise ValueError(f"update of round {header.round}: payload does not match its header")
    if header.applied:
        codec, bounds = get_codec(header.codec), list(header.shard_bounds)
        if bounds[0] != 0 or bounds[-1] != state.theta.numel() or len(header.shard_bytes) != len(bounds) - 1:
            raise ValueError(f"update of round {header.round}: shard map does not cover the parameters")
        grad, offset = torch.empty(state.theta.numel(), dtype=torch.float32), 0
        for j, size in enumerate(header.shard_bytes):   # each shard decoded into its slice
            codec.decode(payload[offset:offset + size], bounds[j + 1] - bounds[j], grad[bounds[j]:bounds[j + 1]])
            offset += size
        theta, mom = outer_step(state.theta, state.momentum, grad, lr, momentum)
        new = GlobalState(theta, mom, state.round + 1, state.global_samples + header.samples)
    else:
        new = GlobalState(state.theta, state.momentum, state.round + 1, state.global_samples)
    if new.digest() != header.digest_after:
        raise ValueError(f"round {header.round}: replayed digest {new.digest()[:12]} differs from the "
                         f"donor's {header.digest_after[:12]}")
    return new


async def replay(channels: Channels, donor: tuple[str, str], state: GlobalState, to_round: int, lr: float,
                 momentum: float, deadline: Deadline, received: Received | None = None) -> GlobalState:
    """Fetches and applies the updates from `state.round` to `to_round` from one donor
    (`received` counts the bytes that came, also when it fails)."""
    peer_id, address = donor
    req = pb.UpdatesRequest(from_round=state.round, to_round=to_round)
    call = channels.stub(address).GetUpdates(req, timeout=deadline.left(0.1))
    loop = asyncio.get_running_loop()
    header, buf, num_bytes = None, bytearray(), 0
    mac, index = OFF, 0   # each round's update is sealed on its own, counted from its header's chunk
    try:
        async for chunk in call:
            if chunk.HasField("header"):
                mac, index = channels.signer.macs.update(chunk.header.round, peer_id[-6:]), 0
            mac.check(index, chunk)
            index += 1
            if chunk.HasField("header"):
                if header is not None:
                    state = await loop.run_in_executor(None, apply_update, state, header, bytes(buf), lr, momentum)
                header, buf = chunk.header, bytearray()
                if header.num_bytes > 16 * 8 * state.theta.numel():
                    raise ValueError(f"update of round {header.round} announces {header.num_bytes} bytes")
            buf += chunk.data
            num_bytes += len(chunk.data)
            if received is not None:
                received.num_bytes += len(chunk.data)
            if header is None or len(buf) > header.num_bytes:
                raise ValueError("update stream out of order")
        if header is None:
            raise ValueError("donor sent no update")
        state = await loop.run_in_executor(None, apply_update, state, header, bytes(buf), lr, momentum)
    except grpc.aio.AioRpcError as e:
        raise ValueError(f"{peer_id[-6:]}: {describe_rpc_error(e)}") from None
    if state.round != to_round:
        raise ValueError(f"replay stopped at round {state.round}, expected {to_round}")
    log.info("caught up to round %d by replaying the updates of %s (%.2f MB instead of a %.2f MB state)",
             to_round, peer_id[-6:], num_bytes / 1e6, 8 * state.theta.numel() / 1e6)
    return state
