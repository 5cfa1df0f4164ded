"""Validation before use: every handler's request passes here first (server.Servicer), after
peer.net.auth established who sent it. A field that names a peer speaks only for the caller: a
request whose claimed id is not the signed caller's is refused, so nobody speaks for anyone else.
Message sizes are bounded before any allocation by the channel options (client.MAX_MESSAGE_BYTES).
Runs on the network loop."""

from __future__ import annotations

import grpc

from peer._proto import peer_pb2 as pb
from peer.net.client import Reject

# The field of each request that names its sender; it must be the signed caller.
_SENDER = {
    pb.JoinRequest: lambda r: r.member.peer_id,
    pb.CommitRequest: lambda r: r.peer_id,
    pb.ProgressRequest: lambda r: r.peer_id,
    pb.ShardRequest: lambda r: r.requester,
    pb.DialBackRequest: lambda r: r.peer_id,
    pb.ShardHeader: lambda r: r.sender,
}
# Requests whose requester field is only a name for logs: it is replaced by the caller's id.
_NAMED = (pb.StateRequest, pb.UpdatesRequest)


def sender(request, caller_id: str) -> None:
    """Refuses (PERMISSION_DENIED) a request that claims to come from another peer than its signer."""
    if isinstance(request, _NAMED):
        request.requester = caller_id
        return
    claimed = _SENDER[type(request)](request)
    if claimed != caller_id:
        raise Reject(grpc.StatusCode.PERMISSION_DENIED,
                     f"the call is signed by {caller_id[-6:]} but claims to come from {claimed[-6:] or '(nobody)'!r}: "
                     "a peer speaks only for itself")
