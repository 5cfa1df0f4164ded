"""TLS files of a run: a run CA and the peer certificates it issues (`peer tls init-ca DIR`,
`peer tls issue --ca DIR --out DIR`), and the check a peer makes of its --tls-cert, --tls-key and
--tls-ca before anything starts (readable PEM, the key is the certificate's, the CA signed it, both
valid now). Pure: files and `cryptography`, no network; errors are ConfigError (exit status 2).

Names: peers dial each other by address (host:port, often an IP behind NAT), so no certificate can
name them all. Every peer certificate carries one fixed DNS name, SERVER_NAME, and every channel
checks that name (`grpc.ssl_target_name_override`): a certificate counts because the run's CA issued
it, whatever address it answers at; who the peer is comes from its signed calls and Health's id."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peer.config import EXIT_CONFIG, EXIT_OK, ConfigError

SERVER_NAME = "diloco-peer"   # the DNS name in every peer certificate, checked by every channel
CA_FILES, PEER_FILES = ("ca.pem", "ca.key"), ("peer.pem", "peer.key")


@dataclass(frozen=True)
class TlsFiles:
    """A peer's checked TLS material (PEM bytes) and its CA's fingerprint (the run spec's `tls_ca`)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes
    ca_sha256: str


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER bytes, hex: how the run spec and log lines name a CA."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"--{flag}: cannot read {path!r}: {e.strerror or e}") from None


def _cert(flag: str, path: str) -> x509.Certificate:
    data = _read(flag, path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"--{flag}: {path!r} is not a PEM certificate") from None


def _valid_now(flag: str, path: str, cert: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"--{flag}: {path!r} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                          "(check this machine's clock)")
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"--{flag}: {path!r} expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC: issue a new "
                          "one (peer tls issue)")


def load(cert_path: str, key_path: str, ca_path: str) -> TlsFiles:
    """The three files, checked; ConfigError naming the flag, the file and what to do."""
    ca, cert = _cert("tls-ca", ca_path), _cert("tls-cert", cert_path)
    key_pem = _read("tls-key", key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"--tls-key: {key_path!r} is not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"--tls-key: {key_path!r} is not the key of the certificate {cert_path!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"--tls-cert: {cert_path!r} was not issued by the CA {ca_path!r} (sha256 "
                          f"{fingerprint(ca)[:16]}): issue it with that CA (peer tls issue --ca ...)") from None
    _valid_now("tls-ca", ca_path, ca)
    _valid_now("tls-cert", cert_path, cert)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if SERVER_NAME not in names:
        raise ConfigError(f"--tls-cert: {cert_path!r} does not name {SERVER_NAME!r} (DNS), the name every peer "
                          "checks: issue it with peer tls issue")
    return TlsFiles(cert.public_bytes(serialization.Encoding.PEM), key_pem, ca.public_bytes(serialization.Encoding.PEM),
                    fingerprint(ca))


# ---- making them: `peer tls` ----------------------------------------------------------------------
def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _free(folder: Path, names: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    taken = [n for n in names if (folder / n).exists()]
    if taken:
        raise ConfigError(f"{folder / taken[0]} exists already: pick another folder (nothing was overwritten)")


def init_ca(folder: Path | str, days: int = 3650, common_name: str = "diloco run CA") -> Path:
    """A new run CA: folder/ca.pem (give it to every peer) and folder/ca.key (keep it; mode 0600)."""
    folder = Path(folder)
    _free(folder, CA_FILES)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(folder / "ca.key", _key_pem(key), private=True)
    _write(folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return folder


def issue(ca_folder: Path | str, out: Path | str, days: int = 365, common_name: str = "diloco peer",
          valid_from: datetime.datetime | None = None) -> Path:
    """A peer certificate from the CA in `ca_folder`: out/peer.pem, out/peer.key (0600) and a copy of
    out/ca.pem, the three files of --tls-cert, --tls-key and --tls-ca."""
    ca_folder, out = Path(ca_folder), Path(out)
    ca_cert = _cert("ca", str(ca_folder / "ca.pem"))
    ca_key_pem = _read("ca", str(ca_folder / "ca.key"))
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"--ca: {ca_folder / 'ca.key'} is not an unencrypted PEM private key") from None
    _free(out, (*PEER_FILES, "ca.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))   # type: ignore[arg-type]
    _write(out / "peer.key", _key_pem(key), private=True)
    _write(out / "peer.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return out


def main(argv: list[str]) -> int:
    """`peer tls init-ca DIR` and `peer tls issue --ca DIR --out DIR [--days N]`."""
    p = argparse.ArgumentParser(prog="peer tls", description="Make a run CA and peer certificates for "
                                "--tls-cert, --tls-key and --tls-ca.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ca = sub.add_parser("init-ca", help="a new run CA in DIR (ca.pem for every peer, ca.key kept private)")
    ca.add_argument("dir")
    ca.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    peer = sub.add_parser("issue", help="a peer certificate: OUT/peer.pem, OUT/peer.key and OUT/ca.pem")
    peer.add_argument("--ca", required=True, help="the folder of `peer tls init-ca`")
    peer.add_argument("--out", required=True, help="a folder for the peer's three files")
    peer.add_argument("--days", type=int, default=365, help="validity (default 365)")
    p.exit = lambda status=0, message=None: (sys.stderr.write(message or ""), sys.exit(  # type: ignore
        EXIT_CONFIG if status else EXIT_OK))
    args = p.parse_args(argv)
    try:
        if args.cmd == "init-ca":
            folder = init_ca(args.dir, args.days)
            print(f"run CA in {folder}: give {folder / 'ca.pem'} to every peer, keep {folder / 'ca.key'} private; "
                  f"sha256 {fingerprint(_cert('ca', str(folder / 'ca.pem')))}")
        else:
            out = issue(args.ca, args.out, args.days)
            print(f"peer certificate in {out}: --tls-cert {out / 'peer.pem'} --tls-key {out / 'peer.key'} "
                  f"--tls-ca {out / 'ca.pem'}")
    except ConfigError as e:
        print(f"peer tls: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
