"""A peer's identity: an RSA key in a key file (libp2p's format, the one hivemind's `identity_path`
reads), whose public key's hash is the peer id. The same key names the peer in the DHT (p2pd's
peer id), signs its DHT records (hivemind's `RSASignatureValidator`) and signs its gRPC calls
(`peer.net.auth`). Nothing here imports torch; hivemind's crypto only."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

KEY_FILE_NAME = "identity.key"   # in --checkpoint-dir when --identity-file is not given


class IdentityError(ValueError):
    """A key file that cannot be read or is not a key: the peer stops with exit status 2."""


def _key_from_der(der: bytes) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


def _identity_bytes(key: RSAPrivateKey) -> bytes:
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()


@dataclass(frozen=True)
class Identity:
    key: RSAPrivateKey
    peer_id: str          # base58 libp2p peer id: the multihash of the public key
    public_key: bytes     # OpenSSH form ("ssh-rsa AAAA..."), what calls and DHT subkeys carry
    path: str             # the key file ("" for a key that lives only in memory)

    @classmethod
    def from_key(cls, key: RSAPrivateKey, path: str = "") -> Identity:
        data = _identity_bytes(key)
        return cls(key, PeerID.from_identity(data).to_base58(), key.get_public_key().to_bytes(), path)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key held in memory only (a new peer id each start)."""
        return cls.from_key(RSAPrivateKey())

    @classmethod
    def load_or_create(cls, path: str) -> Identity:
        """The key in `path`; a new one written there (mode 0600, atomically) when the file does not exist.
        IdentityError names the file and what to do when it exists but is not a key."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return cls._create(path)
        except OSError as e:
            raise IdentityError(f"identity file {path}: cannot read it ({e.strerror}); fix its permissions or "
                                "pass another --identity-file") from None
        try:
            pb = crypto_pb2.PrivateKey.FromString(data)
            if pb.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError(f"a {crypto_pb2.KeyType.Name(pb.key_type)} key (only RSA keys are supported)")
            key = _key_from_der(pb.data)
        except Exception as e:
            raise IdentityError(f"identity file {path}: not a peer key file ({e}); move it away to make a new "
                                "identity, or pass another --identity-file") from None
        return cls.from_key(key, path)

    @classmethod
    def _create(cls, path: str) -> Identity:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise IdentityError(f"identity file {path}: its folder {folder} does not exist; create it or pass "
                                "another --identity-file")
        key = RSAPrivateKey()
        fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_identity_bytes(key))
            os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR)
            try:
                os.link(tmp, path)  # never replaces a key another process wrote meanwhile
            except FileExistsError:
                return cls.load_or_create(path)
        finally:
            os.unlink(tmp)
        return cls.from_key(key, path)

    def write_temp(self, folder: str) -> str:
        """Writes the key to a private file in `folder` (for p2pd, which reads a file); returns its path."""
        fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(_identity_bytes(self.key))
        return tmp

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


@functools.lru_cache(maxsize=4096)
def _public_key(public_key: bytes) -> RSAPublicKey:
    return RSAPublicKey.from_bytes(public_key)


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_key: bytes) -> str:
    """The peer id a public key (OpenSSH form) stands for; ValueError when it is not an RSA key."""
    try:
        key = serialization.load_ssh_public_key(public_key)
    except Exception as e:
        raise ValueError(f"not an OpenSSH RSA public key: {e}") from None
    der = key.public_bytes(encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    from multihash import coerce_code, encode

    return PeerID(encode(hashlib.sha256(encoded).digest(), coerce_code("sha2-256"))).to_base58()


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when `signature` (base64, as `Identity.sign` makes it) is the key's over `data`."""
    try:
        return _public_key(public_key).verify(data, signature)
    except Exception:
        return False
