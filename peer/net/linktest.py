"""The callee's side of `LinkTest` (`peer doctor`'s upload rate): count the bytes a caller
streams for a few seconds, drop them, and say how many arrived over how long. Bounded in bytes,
seconds and callers at once, so a stranger can make a peer receive no more than it says."""

from __future__ import annotations

import time

from peer._proto import peer_pb2 as pb

LINK_TEST_MAX_BYTES = 64 << 20   # the most one call may send
LINK_TEST_MAX_S = 10.0           # ... and for how long
LINK_TEST_CALLERS = 2            # calls served at once; more are refused


class LinkTests:
    def __init__(self) -> None:
        self.active = 0

    async def handle(self, chunks) -> pb.LinkReply:
        """Reads the stream to its end (or the byte or time cap); the rate counts from the first chunk."""
        from peer.net.client import Reject

        if self.active >= LINK_TEST_CALLERS:
            import grpc

            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.active} link tests run already; try again")
        self.active += 1
        try:
            got, first, last, first_len = 0, 0.0, 0.0, 0
            async for chunk in chunks:
                now = time.monotonic()
                if not got:
                    first, first_len = now, len(chunk.data)
                got += len(chunk.data)
                last = now
                if got >= LINK_TEST_MAX_BYTES or now - first > LINK_TEST_MAX_S:
                    break
            # the first chunk arrived at `first`: the rate is the rest over the span after it
            span = last - first
            return pb.LinkReply(bytes=got - first_len if span > 0 else got, seconds=span if span > 0 else 0.0)
        finally:
            self.active -= 1
