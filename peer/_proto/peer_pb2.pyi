from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "weight", "samples", "client_mode", "carried_weight", "carried_round", "upload_bps")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MODE_FIELD_NUMBER: _ClassVar[int]
    CARRIED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CARRIED_ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BPS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    weight: float
    samples: int
    client_mode: bool
    carried_weight: float
    carried_round: int
    upload_bps: float
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[float] = ..., samples: _Optional[int] = ..., client_mode: _Optional[bool] = ..., carried_weight: _Optional[float] = ..., carried_round: _Optional[int] = ..., upload_bps: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("run_id", "round", "spec_hash", "member", "skip")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    spec_hash: str
    member: Member
    skip: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., spec_hash: _Optional[str] = ..., member: _Optional[_Union[Member, _Mapping]] = ..., skip: _Optional[_Iterable[str]] = ...) -> None: ...

class Roster(_message.Message):
    __slots__ = ("round", "leader", "members", "shard_bounds", "owners", "codec", "numel", "hash")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    leader: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    shard_bounds: _containers.RepeatedScalarFieldContainer[int]
    owners: _containers.RepeatedScalarFieldContainer[str]
    codec: str
    numel: int
    hash: str
    def __init__(self, round: _Optional[int] = ..., leader: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., shard_bounds: _Optional[_Iterable[int]] = ..., owners: _Optional[_Iterable[str]] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("status", "roster", "redirect_address", "redirect_peer_id", "current_round", "reason")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[JoinReply.Status]
        REDIRECT: _ClassVar[JoinReply.Status]
        CLOSED: _ClassVar[JoinReply.Status]
        WRONG_ROUND: _ClassVar[JoinReply.Status]
        REJECTED: _ClassVar[JoinReply.Status]
    OK: JoinReply.Status
    REDIRECT: JoinReply.Status
    CLOSED: JoinReply.Status
    WRONG_ROUND: JoinReply.Status
    REJECTED: JoinReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: JoinReply.Status
    roster: Roster
    redirect_address: str
    redirect_peer_id: str
    current_round: int
    reason: str
    def __init__(self, status: _Optional[_Union[JoinReply.Status, str]] = ..., roster: _Optional[_Union[Roster, _Mapping]] = ..., redirect_address: _Optional[str] = ..., redirect_peer_id: _Optional[str] = ..., current_round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("header", "data", "mac")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    data: bytes
    mac: bytes
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("round", "roster_hash", "sender", "shard", "codec", "numel", "num_bytes", "sha256", "contributors", "weights", "total_weight", "backup", "parts_sha256")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROSTER_HASH_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    PARTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    round: int
    roster_hash: str
    sender: str
    shard: int
    codec: str
    numel: int
    num_bytes: int
    sha256: str
    contributors: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    total_weight: float
    backup: bool
    parts_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., roster_hash: _Optional[str] = ..., sender: _Optional[str] = ..., shard: _Optional[int] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., num_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., contributors: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., total_weight: _Optional[float] = ..., backup: _Optional[bool] = ..., parts_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class ContributeReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ShardRequest(_message.Message):
    __slots__ = ("round", "roster_hash", "shard", "requester", "wait_s", "backup", "header_only")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROSTER_HASH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    HEADER_ONLY_FIELD_NUMBER: _ClassVar[int]
    round: int
    roster_hash: str
    shard: int
    requester: str
    wait_s: float
    backup: bool
    header_only: bool
    def __init__(self, round: _Optional[int] = ..., roster_hash: _Optional[str] = ..., shard: _Optional[int] = ..., requester: _Optional[str] = ..., wait_s: _Optional[float] = ..., backup: _Optional[bool] = ..., header_only: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("round", "roster_hash", "peer_id", "ok", "shard_sha256", "reason", "unreachable")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROSTER_HASH_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHA256_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    round: int
    roster_hash: str
    peer_id: str
    ok: bool
    shard_sha256: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., roster_hash: _Optional[str] = ..., peer_id: _Optional[str] = ..., ok: _Optional[bool] = ..., shard_sha256: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., unreachable: _Optional[_Iterable[str]] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("apply", "reason", "committed", "shard_sha256", "unreachable")
    APPLY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHA256_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    apply: bool
    reason: str
    committed: _containers.RepeatedScalarFieldContainer[str]
    shard_sha256: _containers.RepeatedScalarFieldContainer[str]
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, apply: _Optional[bool] = ..., reason: _Optional[str] = ..., committed: _Optional[_Iterable[str]] = ..., shard_sha256: _Optional[_Iterable[str]] = ..., unreachable: _Optional[_Iterable[str]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("min_round", "requester", "offset", "length", "sha256")
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    min_round: int
    requester: str
    offset: int
    length: int
    sha256: str
    def __init__(self, min_round: _Optional[int] = ..., requester: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "data", "mac")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    data: bytes
    mac: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("round", "global_samples", "numel", "num_bytes", "sha256", "digest", "spec_hash")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    global_samples: int
    numel: int
    num_bytes: int
    sha256: str
    digest: str
    spec_hash: str
    def __init__(self, round: _Optional[int] = ..., global_samples: _Optional[int] = ..., numel: _Optional[int] = ..., num_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., digest: _Optional[str] = ..., spec_hash: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("peer_id", "run_id", "round", "spec_hash", "version", "group_leader", "time")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_LEADER_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    run_id: str
    round: int
    spec_hash: str
    version: str
    group_leader: str
    time: float
    def __init__(self, peer_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., spec_hash: _Optional[str] = ..., version: _Optional[str] = ..., group_leader: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class UpdatesRequest(_message.Message):
    __slots__ = ("from_round", "to_round", "requester")
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    TO_ROUND_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    from_round: int
    to_round: int
    requester: str
    def __init__(self, from_round: _Optional[int] = ..., to_round: _Optional[int] = ..., requester: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "applied", "codec", "shard_bounds", "shard_bytes", "samples", "num_bytes", "sha256", "digest_after")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DIGEST_AFTER_FIELD_NUMBER: _ClassVar[int]
    round: int
    applied: bool
    codec: str
    shard_bounds: _containers.RepeatedScalarFieldContainer[int]
    shard_bytes: _containers.RepeatedScalarFieldContainer[int]
    samples: int
    num_bytes: int
    sha256: str
    digest_after: str
    def __init__(self, round: _Optional[int] = ..., applied: _Optional[bool] = ..., codec: _Optional[str] = ..., shard_bounds: _Optional[_Iterable[int]] = ..., shard_bytes: _Optional[_Iterable[int]] = ..., samples: _Optional[int] = ..., num_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., digest_after: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data", "mac")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    mac: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class ProgressRequest(_message.Message):
    __slots__ = ("run_id", "spec_hash", "round", "peer_id", "steps", "rate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec_hash: str
    round: int
    peer_id: str
    steps: int
    rate: float
    def __init__(self, run_id: _Optional[str] = ..., spec_hash: _Optional[str] = ..., round: _Optional[int] = ..., peer_id: _Optional[str] = ..., steps: _Optional[int] = ..., rate: _Optional[float] = ...) -> None: ...

class ProgressReply(_message.Message):
    __slots__ = ("leader", "allowed_steps", "close", "total_steps", "current_round")
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    leader: bool
    allowed_steps: int
    close: bool
    total_steps: int
    current_round: int
    def __init__(self, leader: _Optional[bool] = ..., allowed_steps: _Optional[int] = ..., close: _Optional[bool] = ..., total_steps: _Optional[int] = ..., current_round: _Optional[int] = ...) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("peer_id", "grpc_address", "tcp_addresses", "timeout_s")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TCP_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    grpc_address: str
    tcp_addresses: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    def __init__(self, peer_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., tcp_addresses: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DialResult(_message.Message):
    __slots__ = ("address", "grpc", "status", "detail", "ms", "answered_by")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[DialResult.Status]
        REFUSED: _ClassVar[DialResult.Status]
        TIMEOUT: _ClassVar[DialResult.Status]
        DNS: _ClassVar[DialResult.Status]
        WRONG_PEER: _ClassVar[DialResult.Status]
        NOT_A_PEER: _ClassVar[DialResult.Status]
        NOT_CALLER: _ClassVar[DialResult.Status]
        UNREACHABLE: _ClassVar[DialResult.Status]
    OK: DialResult.Status
    REFUSED: DialResult.Status
    TIMEOUT: DialResult.Status
    DNS: DialResult.Status
    WRONG_PEER: DialResult.Status
    NOT_A_PEER: DialResult.Status
    NOT_CALLER: DialResult.Status
    UNREACHABLE: DialResult.Status
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    address: str
    grpc: bool
    status: DialResult.Status
    detail: str
    ms: float
    answered_by: str
    def __init__(self, address: _Optional[str] = ..., grpc: _Optional[bool] = ..., status: _Optional[_Union[DialResult.Status, str]] = ..., detail: _Optional[str] = ..., ms: _Optional[float] = ..., answered_by: _Optional[str] = ...) -> None: ...

class DialBackReply(_message.Message):
    __slots__ = ("peer_id", "caller_host", "results")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_HOST_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    caller_host: str
    results: _containers.RepeatedCompositeFieldContainer[DialResult]
    def __init__(self, peer_id: _Optional[str] = ..., caller_host: _Optional[str] = ..., results: _Optional[_Iterable[_Union[DialResult, _Mapping]]] = ...) -> None: ...

class LinkChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class LinkReply(_message.Message):
    __slots__ = ("bytes", "seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
