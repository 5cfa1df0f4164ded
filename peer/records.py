"""Signed DHT records. Every record a peer writes sits under its *protected subkey*,
`<peer id>[owner:<ssh-rsa public key>]`: hivemind's `RSASignatureValidator` signs the value with
the key named there (on store) and refuses a value whose signature does not match it, and
`OwnerIdValidator` refuses a subkey whose id is not that key's hash, so nobody can write under
another peer's id, with or without a key of their own. Every node (peers, the bootstrap, doctor,
`peer status`) installs both (`validators`), and hivemind runs them on every store a node is asked
to keep and on every record a lookup returns (`DHTProtocol.rpc_store`, `call_find`).

Readers keep only protected subkeys (`owner_of`): an unprotected subkey still passes the DHT's
validators (hivemind's own records, e.g. its averager's, are unprotected) but means nothing to us.

Private runs (`--run-secret`): every record a peer writes is `{"member": proof, "value": value}`,
the proof an HMAC under a key derived from the secret (`auth.derived_key(secret, "member")`, held
by the node as `dht.member_key`) over the DHT key (the run and the record's kind) and the signer's
peer id (`member_proof`). Only that id's key can sign under its subkey, so a proof cannot be moved to
another peer, nor to another run or kind of record. A private peer reads only records with a valid
proof (`opened`): a stranger's record, or one of a run with another secret, is skipped (and counted
as such); a reader without the secret (the bootstrap's page, `peer status`) unwraps them unchecked.

No value schema is checked in the DHT: hivemind drops a node's whole answer for a key when one
of its subkeys fails validation, so a well-signed but malformed record that some node without the
check kept would hide every honest record that node holds. The readers' parsers check values per
subkey instead (`swarm.PeerRecord.parse`, `swarm.parse_history`, ...), and skip only the bad one."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from peer.identity import Identity, peer_id_of

MAX_ID_CHARS = 80   # base58 ids of RSA keys are 46 characters; anything longer is not a peer id
_PROTECTED = re.compile(rf"(?P<id>[1-9A-HJ-NP-Za-km-z]{{1,{MAX_ID_CHARS}}})\[owner:(?P<key>ssh-rsa [A-Za-z0-9+/=]+)\]")


def owner_subkey(identity: Identity) -> str:
    """The subkey a peer writes every record under (the one the validators let only its key sign)."""
    return f"{identity.peer_id}[owner:{identity.public_key.decode()}]"


def owner_of(subkey: object) -> str | None:
    """The peer id a protected subkey stands for, or None when it is not one (unprotected, malformed,
    or an id that is not its key's hash)."""
    if not isinstance(subkey, str):
        return None
    m = _PROTECTED.fullmatch(subkey)
    if m is None:
        return None
    try:
        return m["id"] if peer_id_of(m["key"].encode()) == m["id"] else None
    except ValueError:
        return None


class OwnerIdValidator(RecordValidatorBase):
    """Refuses a protected subkey (one with an owner marker) whose id prefix is not the hash of the
    key in its marker. Runs after `RSASignatureValidator` (a lower priority), which checked that this
    key signed the value; records without a marker pass (readers ignore them)."""

    def validate(self, record: DHTRecord) -> bool:
        if RSASignatureValidator.PUBLIC_KEY_FORMAT[:7] not in record.subkey:   # b"[owner:"
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return False
        return owner_of(subkey) is not None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, OwnerIdValidator)   # one is enough


def validators(identity: Identity) -> list[RecordValidatorBase]:
    """What every node of a run installs: signing with `identity`'s key, checking everyone's. A node
    that only reads (doctor, `peer status`) validates the same with a key of its own."""
    return [RSASignatureValidator(identity.key), OwnerIdValidator()]


def member_key_of(dht: object) -> bytes:
    """The member key a node writes and checks private-run records with (b"": a public run)."""
    key = getattr(dht, "member_key", b"")
    return key if isinstance(key, bytes) else b""


def member_proof(key: bytes, dht_key: str, peer_id: str) -> str:
    return hmac.new(key, f"diloco-member\n{dht_key}\n{peer_id}".encode(), hashlib.sha256).hexdigest()


def sealed(key: bytes, dht_key: str, peer_id: str, value: Any) -> Any:
    """What a peer stores under `dht_key`: in a private run (`key`) the value with its member proof."""
    return {"member": member_proof(key, dht_key, peer_id), "value": value} if key else value


def opened(key: bytes, dht_key: str, peer_id: str, stored: Any) -> tuple[Any, bool]:
    """(the value, whether it counts) of what `peer_id` stored under `dht_key`: with `key`, only a value
    sealed with a valid proof counts; without, every value, unwrapped when it was sealed."""
    wrapped = isinstance(stored, dict) and set(stored) == {"member", "value"} and isinstance(stored["member"], str)
    value = stored["value"] if wrapped else stored
    if not key:
        return value, True
    return value, wrapped and hmac.compare_digest(stored["member"], member_proof(key, dht_key, peer_id))
