"""Global state over the wire: a snapshot the trainer hands over after each round, served in
chunks, and the download a newcomer makes (sha256-checked, resumable across donors, never
pickled). Runs on the network loop; packing/unpacking large tensors goes to an executor."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from peer._proto import peer_pb2 as pb
from peer.net.client import CHUNK_BYTES, Channels, describe_rpc_error
from peer.net.loop import Deadline
from peer.outer import GlobalState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateSnapshot:
    """Immutable bytes of one round's global state: theta then momentum, float32 little-endian."""

    header: pb.StateHeader
    payload: bytes

    @classmethod
    def of(cls, state: GlobalState, spec_hash: str) -> StateSnapshot:
        payload = (state.theta.numpy().astype("<f4", copy=False).tobytes()
                   + state.momentum.numpy().astype("<f4", copy=False).tobytes())
        header = pb.StateHeader(round=state.round, global_samples=state.global_samples,
                                numel=state.theta.numel(), num_bytes=len(payload),
                                sha256=hashlib.sha256(payload).hexdigest(), digest=state.digest(),
                                spec_hash=spec_hash)
        return cls(header, payload)

    def chunks(self, offset: int, length: int = 0):
        """The bytes [offset, offset + length) (length 0: to the end), the header first."""
        end = offset + length if length else len(self.payload)
        yield pb.StateChunk(header=self.header, data=self.payload[offset:min(end, offset + CHUNK_BYTES)])
        for i in range(offset + CHUNK_BYTES, end, CHUNK_BYTES):
            yield pb.StateChunk(data=self.payload[i:min(end, i + CHUNK_BYTES)])


def unpack(header: pb.StateHeader, payload: bytes) -> GlobalState:
    """Checks and unpacks a downloaded state; raises ValueError saying what is wrong."""
    if len(payload) != header.num_bytes or header.num_bytes != 8 * header.numel:
        raise ValueError(f"state payload has {len(payload)} bytes, expected {8 * header.numel}")
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise ValueError("state payload sha256 does not match its header")
    arr = np.frombuffer(payload, dtype="<f4")
    if not np.isfinite(arr).all():
        raise ValueError("state holds non-finite values")
    theta = torch.from_numpy(arr[:header.numel].copy())
    momentum = torch.from_numpy(arr[header.numel:].copy())
    state = GlobalState(theta=theta, momentum=momentum, round=header.round, global_samples=header.global_samples)
    if state.digest() != header.digest:
        raise ValueError("state digest does not match its header")
    return state


class _OtherState(Exception):
    """The donor serves a different state than the bytes already held: start over from it."""


async def download_from(channels: Channels, address: str, req: pb.StateRequest, expected_numel: int,
                        spec_hash: str, partial: bytearray, known_sha: list[str], deadline: Deadline
                        ) -> GlobalState:
    """Downloads from one donor into `partial`, kept on failure so that a donor of the same
    state (`known_sha`) can resume it."""
    call = channels.stub(address).GetState(req, timeout=deadline.left(0.1))
    header = None
    async for chunk in call:
        if header is None:
            header = chunk.header
            if header.numel != expected_numel or header.spec_hash != spec_hash:
                raise ValueError(f"donor offers {header.numel} values of spec {header.spec_hash}, "
                                 f"expected {expected_numel} of {spec_hash}")
            if header.num_bytes != 8 * expected_numel:
                raise ValueError(f"donor announces {header.num_bytes} bytes, expected {8 * expected_numel}")
            if req.offset and known_sha and header.sha256 != known_sha[0]:
                call.cancel()
                raise _OtherState()
            known_sha[:] = [header.sha256]
        partial += chunk.data
        if len(partial) > header.num_bytes:
            raise ValueError("donor sent more bytes than announced")
    if header is None:
        raise ValueError("donor sent no header")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, unpack, header, bytes(partial))


async def download(channels: Channels, donors: list[tuple[str, str]], min_round: int, me: str,
                   expected_numel: int, spec_hash: str, deadline: Deadline) -> GlobalState:
    """Tries donors (peer id, address) in turn; one serving the same state resumes the bytes."""
    errors: list[str] = []
    partial, known_sha = bytearray(), []
    queue = list(donors)
    while queue and not deadline.expired():
        peer_id, address = queue[0]
        req = pb.StateRequest(min_round=min_round, requester=me, offset=len(partial))
        try:
            started = time.monotonic()
            state = await download_from(channels, address, req, expected_numel, spec_hash, partial, known_sha,
                                        deadline)
            log.info("downloaded the state of round %d from %s (%s): %.1f MB in %.2f s",
                     state.round, peer_id[-6:], address, 8 * expected_numel / 1e6, time.monotonic() - started)
            return state
        except _OtherState:
            partial.clear()
            continue  # same donor, from the start
        except (grpc.aio.AioRpcError, ValueError, asyncio.TimeoutError) as e:
            why = describe_rpc_error(e) if isinstance(e, grpc.aio.AioRpcError) else str(e)
            errors.append(f"{peer_id[-6:]} at {address}: {why}")
            log.warning("state download from %s at %s failed after %d bytes: %s; trying the next donor",
                        peer_id[-6:], address, len(partial), why)
            if isinstance(e, ValueError):
                partial.clear()
            queue.pop(0)
    raise RuntimeError(f"could not download the state of round >= {min_round}: "
                       + ("; ".join(errors) or "no live donor holds it"))
