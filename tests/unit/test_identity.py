"""A peer's identity: a key file reused across restarts, whose public key's hash is the peer id
(the same id p2pd gives the peer's DHT node)."""

import os
import stat

import pytest
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

from peer.identity import Identity, IdentityError, peer_id_of, verify


def test_a_key_file_is_made_once_and_reused(tmp_path):
    path = tmp_path / "identity.key"
    first = Identity.load_or_create(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Identity.load_or_create(str(path))
    assert again.peer_id == first.peer_id and again.public_key == first.public_key
    # the id is libp2p's for the same file (p2pd reads it as --identity-path) and the key's hash
    assert PeerID.from_identity(path.read_bytes()).to_base58() == first.peer_id == peer_id_of(first.public_key)
    assert Identity.generate().peer_id != first.peer_id


def test_signatures_verify_only_with_the_signers_key():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"round 3")
    assert verify(a.public_key, b"round 3", sig)
    assert not verify(a.public_key, b"round 4", sig)
    assert not verify(b.public_key, b"round 3", sig)
    assert not verify(b"ssh-rsa not-a-key", b"round 3", sig)
    assert not verify(a.public_key, b"round 3", b"!!")


@pytest.mark.parametrize("content", [b"", b"junk", b"\x08\x01\x12\x03abc"])
def test_a_file_that_is_not_a_key_is_refused_and_kept(tmp_path, content):
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match="not a peer key file.*move it away"):
        Identity.load_or_create(str(path))
    assert path.read_bytes() == content   # nothing overwritten


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load_or_create(str(tmp_path / "nope" / "identity.key"))


def test_peer_id_of_refuses_what_is_not_a_key():
    with pytest.raises(ValueError, match="not an OpenSSH RSA public key"):
        peer_id_of(b"ssh-rsa AAAA")
