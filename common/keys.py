"""The key material of a fedpersona deployment: a CA, the SuperLink's TLS certificate,
authentication key pairs for SuperNodes, and the SuperExec shared secret.

``fedpersona server init`` writes the server's part (:func:`make_certs` with no node keys), a
device makes its own key pair when it joins (:func:`write_node_keys`), and
``scripts/make_certs.py`` makes all of it in one folder (the Compose demo, the tests)::

    python scripts/make_certs.py --out certs --nodes 3 --host superlink

Writes into ``--out``:

* ``ca.crt`` / ``ca.key`` — a self-signed CA (EC P-384). Only ``ca.crt`` is handed out: the
  SuperNodes (``--root-certificates``), the SuperExecs and the ``flwr`` CLI
  (``root-certificates`` in ``$FLWR_HOME/config.toml``) verify the SuperLink with it.
* ``server.pem`` / ``server.key`` — the SuperLink's certificate, signed by the CA, valid for
  ``127.0.0.1``, ``::1``, ``localhost`` and every ``--host`` (e.g. ``superlink`` in Docker
  Compose, the Service name or public DNS name in Kubernetes).
* ``supernode-<i>.key`` / ``supernode-<i>.pub`` — SuperNode *i*'s authentication key pair, in the
  format Flower 1.42 reads: an EC (NIST P-384) private key in OpenSSH format for
  ``flower-supernode --auth-supernode-private-key``, and its OpenSSH public key for
  ``flwr supernode register`` (what ``ssh-keygen -t ecdsa -b 384`` makes).
* ``superexec.secret`` — 32 random bytes (hex) shared by the SuperLink and the SuperExec that
  runs ServerApps (``--superexec-auth-secret-file``), so that nobody else who reaches the
  SuperLink's port can take a ServerApp task.

Private keys and the secret are written with mode 0600, certificates and public keys 0644. An
existing output is never overwritten unless ``--force`` is given. Containers of the official
Flower images run as uid 49999: ``--owner 49999`` (as root) hands the files the containers
read to that user — not ``ca.key``, which no container needs (keep it offline).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
CURVE = ec.SECP384R1
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
CA_FILES = ("ca.crt", "ca.key")
SERVER_FILES = ("server.pem", "server.key")
SUPEREXEC_SECRET = "superexec.secret"


def node_files(index: int) -> tuple[str, str]:
    """File names of SuperNode ``index``'s key pair: ``(private, public)``."""
    return f"supernode-{index}.key", f"supernode-{index}.pub"


def expected_files(nodes: int) -> list[str]:
    """Every file :func:`make_certs` writes for ``nodes`` SuperNodes."""
    names = [*CA_FILES, *SERVER_FILES, SUPEREXEC_SECRET]
    for i in range(nodes):
        names.extend(node_files(i))
    return names


@dataclass(frozen=True)
class CertFiles:
    """Paths of what :func:`make_certs` wrote."""

    out: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    superexec_secret: Path
    node_keys: tuple[tuple[Path, Path], ...]  # (private, public) per SuperNode


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never world-readable, even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed a public file


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpersona"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    """SAN entries: IP addresses as ``IPAddress``, everything else as ``DNSName``."""
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # ordered, without duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(*, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    name = _name("fedpersona CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    hosts: Sequence[str],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's TLS certificate for ``hosts``, signed by the CA.

    Carries what strict verifiers (Python ≥ 3.13's ``VERIFY_X509_STRICT``) require: SAN,
    authority key identifier, ``serverAuth`` and a critical non-CA basic constraint.
    """
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def make_node_keys() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: ``(OpenSSH private key, OpenSSH public key)``."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def write_node_keys(private: Path, public: Path) -> bytes:
    """Make a SuperNode key pair into ``private`` (0600) and ``public`` (0644); return the
    public key (what the operator registers).

    Raises:
        FileExistsError: If either file exists (a device keeps the pair it registered).
    """
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to replace a registered key")
    private.parent.mkdir(parents=True, exist_ok=True)
    key, pub = make_node_keys()
    _write(private, key, PRIVATE_MODE)
    _write(public, pub, PUBLIC_MODE)
    return pub


def make_certs(
    out: Path | str,
    *,
    nodes: int,
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> CertFiles:
    """Write the deployment's key material into ``out`` (see the module docstring).

    Raises:
        ValueError: If ``nodes`` < 1 or ``days`` < 1.
        FileExistsError: If an output already exists and ``force`` is false (nothing is
            written then).
    """
    if nodes < 0:
        raise ValueError(f"--nodes must be >= 0, got {nodes}")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    out = Path(out)
    existing = [n for n in expected_files(nodes) if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; refusing to overwrite key material "
            "(pass --force to replace all of it, which invalidates every registered SuperNode "
            "and every copy of ca.crt)"
        )
    out.mkdir(parents=True, exist_ok=True)

    ca_cert, ca_key = make_ca(days=days)
    server_cert, server_key = make_server_cert(
        ca_cert, ca_key, hosts=[*DEFAULT_HOSTS, *hosts], days=days
    )
    pem = serialization.Encoding.PEM
    _write(out / "ca.crt", ca_cert.public_bytes(pem), PUBLIC_MODE)
    _write(out / "ca.key", _pem_key(ca_key), PRIVATE_MODE)
    _write(out / "server.pem", server_cert.public_bytes(pem), PUBLIC_MODE)
    _write(out / "server.key", _pem_key(server_key), PRIVATE_MODE)
    _write(out / SUPEREXEC_SECRET, secrets.token_hex(32).encode(), PRIVATE_MODE)
    node_keys = []
    for i in range(nodes):
        private, public = make_node_keys()
        priv_name, pub_name = node_files(i)
        _write(out / priv_name, private, PRIVATE_MODE)
        _write(out / pub_name, public, PUBLIC_MODE)
        node_keys.append((out / priv_name, out / pub_name))
    return CertFiles(
        out=out,
        ca_cert=out / "ca.crt",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        superexec_secret=out / SUPEREXEC_SECRET,
        node_keys=tuple(node_keys),
    )


def _chown(files: CertFiles, owner: str, nodes: int) -> None:
    """Hand the files a container reads to ``UID[:GID]`` — never the CA's private key, which
    stays with whoever ran this (it signs; no container needs it)."""
    uid_text, _, gid_text = owner.partition(":")
    uid, gid = int(uid_text), int(gid_text or uid_text)
    for name in expected_files(nodes):
        if name != "ca.key":
            os.chown(files.out / name, uid, gid)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. certs)")
    parser.add_argument("--nodes", type=int, required=True, help="SuperNode key pairs to make")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra name or IP of the SuperLink for the certificate's SAN (repeatable)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing key material")
    parser.add_argument(
        "--owner",
        default=None,
        help="UID[:GID] to own the files containers read, not ca.key (needs root); 49999 for "
        "the Flower images' user",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    try:
        if args.nodes < 1:  # the server alone: `fedpersona server init`
            raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
        files = make_certs(
            args.out, nodes=args.nodes, hosts=args.host, days=args.days, force=args.force
        )
        if args.owner:
            _chown(files, args.owner, args.nodes)
    except (ValueError, FileExistsError, PermissionError) as err:
        print(f"make_certs: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(expected_files(args.nodes))} files to {files.out}:")
    for name in expected_files(args.nodes):
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
