"""Keys for a device's encrypted store: key derivation, key wrapping and AES-GCM sealing.

Envelope encryption, as password managers and messengers do it: the SQLCipher database is
encrypted with a random 256-bit *data key*; the data key is kept next to the database only
*wrapped* (AES-256-GCM) under a *key-encryption key* that comes from the user's passphrase
(scrypt) or from a 0600 key file. So

* a wrong passphrase, a wrong key file or a flipped byte in the wrapped key fails the GCM tag
  and is reported as such, never silently accepted;
* changing the passphrase re-wraps 32 bytes instead of re-encrypting the database;
* ``forget`` overwrites and deletes the wrapped key: the database is unreadable from that
  moment (crypto-erase), before its file is deleted too.

Everything here is ``cryptography``'s primitives; nothing is home-made.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.atomic import atomic_write_bytes

KEY_BYTES = 32
NONCE_BYTES = 12
# scrypt cost for new wrapped keys: 2^17 * 8 * 128 B = 128 MiB per unlock (OWASP's minimum for
# passphrases; a device store is unlocked once per process). Keys wrapped under 2^15 before
# still open (the header carries n) and are re-wrapped at 2^17 on the next passphrase change.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
WRAP_VERSION = 1
PASSPHRASE_ENV = "FEDPERSONA_PASSPHRASE"
PASSPHRASE_FILE_ENV = "FEDPERSONA_PASSPHRASE_FILE"  # a file holding it (a container secret)
MIN_PASSPHRASE_CHARS = 8


class StoreKeyError(Exception):
    """A problem with the key that unlocks a device store."""


class WrongKey(StoreKeyError):
    """The passphrase or key file does not unlock this store, or the wrapped key was altered."""


class NoSecret(ValueError):
    """No passphrase or key file was given anywhere (a terminal may still ask for one)."""


class InsecureKeyFile(StoreKeyError):
    """A key file readable by other users is refused."""


@dataclass(frozen=True)
class Secret:
    """Where the key-encryption key comes from: a passphrase or a key file (exactly one)."""

    passphrase: str | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (self.key_file is None):
            raise ValueError("give exactly one of a passphrase or a key file")
        if self.passphrase is not None and len(self.passphrase) < MIN_PASSPHRASE_CHARS:
            raise ValueError(
                f"passphrase too short: use at least {MIN_PASSPHRASE_CHARS} characters"
            )

    @property
    def kind(self) -> str:
        """``"passphrase"`` or ``"key-file"``."""
        return "passphrase" if self.passphrase is not None else "key-file"


def _long_enough(passphrase: str, where: str) -> Secret:
    """A passphrase from the environment, refused (never replaced by a prompt) when short."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ValueError(
            f"{where} is {len(passphrase)} characters long: a passphrase needs at least "
            f"{MIN_PASSPHRASE_CHARS}; set a longer one or use --key-file"
        )
    return Secret(passphrase=passphrase)


# The passphrase this process was given at a prompt (:func:`keep_secret`), and those it read
# from pipes (``/dev/fd/N``: readable once): held in memory, never put back into an
# environment a process listing or a child would see.
_KEPT: Secret | None = None
_PIPED: dict[str, Secret] = {}


def keep_secret(secret: Secret) -> None:
    """Hold ``secret`` for this process's later :func:`resolve_secret` calls (a long-lived
    worker opens its store once per message)."""
    global _KEPT
    _KEPT = secret


def read_passphrase_file(path: str | Path) -> str:
    """The passphrase in ``path`` (its one line): a regular file must be private to its owner,
    as a key file is; a pipe (``/dev/fd/N``) or a container secret's mount is read as is.

    Raises:
        InsecureKeyFile: A regular file other users may read.
        ValueError: It cannot be read.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISREG(mode) and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecureKeyFile(
                f"passphrase file {path} is readable by other users (mode "
                f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
            )
        return path.read_text().removesuffix("\n")
    except OSError as err:
        raise ValueError(
            f"cannot read the passphrase file {path} ({PASSPHRASE_FILE_ENV}): {err.strerror}"
        ) from None


def resolve_secret(*, passphrase: str | None = None, key_file: Path | str | None = None) -> Secret:
    """The secret to use: an explicit passphrase, a key file, ``$FEDPERSONA_PASSPHRASE``, the
    file ``$FEDPERSONA_PASSPHRASE_FILE`` names (its one line, :func:`read_passphrase_file`;
    a pipe's, read once, is remembered), or the one this process keeps (:func:`keep_secret`).

    Raises:
        NoSecret: If none is given anywhere.
        InsecureKeyFile: The passphrase file is readable by other users.
        ValueError: If the one given is too short or its file cannot be read.
    """
    if passphrase is not None:
        return Secret(passphrase=passphrase)
    if key_file is not None:
        return Secret(key_file=Path(key_file).expanduser())
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return _long_enough(env, f"${PASSPHRASE_ENV}")
    file = os.environ.get(PASSPHRASE_FILE_ENV)
    if file in _PIPED:
        return _PIPED[file]
    if file:  # e.g. a container secret: not in the environment `docker inspect` shows
        secret = _long_enough(read_passphrase_file(file), f"the passphrase in {file}")
        if not Path(file).is_file():  # a pipe: it cannot be read again
            _PIPED[file] = secret
        return secret
    if _KEPT is not None:
        return _KEPT
    raise NoSecret(
        f"no key for the device store: pass --key-file, or set {PASSPHRASE_ENV} or "
        f"{PASSPHRASE_FILE_ENV} (or enter a passphrase when asked)"
    )


def create_key_file(path: Path) -> Path:
    """Write a fresh random 256-bit key to ``path`` with mode 0600 (refuses to overwrite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path


def read_key_file(path: Path) -> bytes:
    """The key in a 0600 key file (as :func:`create_key_file` writes one).

    Raises:
        FileNotFoundError: No such file.
        InsecureKeyFile: Other users may read it.
        WrongKey: It holds no hex-encoded key of the right length.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"key file {path} not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"key file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise WrongKey(f"key file {path} is not a hex-encoded key") from None
    if len(key) != KEY_BYTES:
        raise WrongKey(f"key file {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def _kek(secret: Secret, salt: bytes, params: dict[str, int]) -> bytes:
    if secret.key_file is not None:
        return read_key_file(secret.key_file)
    assert secret.passphrase is not None
    kdf = Scrypt(salt=salt, length=KEY_BYTES, n=params["n"], r=params["r"], p=params["p"])
    return kdf.derive(secret.passphrase.encode())


def _aad(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True).encode()


def seal(key: bytes, plaintext: bytes, *, aad: bytes = b"") -> bytes:
    """AES-256-GCM: ``nonce || ciphertext+tag``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, *, aad: bytes = b"") -> bytes:
    """Inverse of :func:`seal`.

    Raises:
        WrongKey: If the key is wrong or ``blob``/``aad`` was altered.
    """
    if len(blob) < NONCE_BYTES + 16:
        raise WrongKey("sealed blob is truncated")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise WrongKey("authentication failed: wrong key, or the data was tampered with") from None


def wrap_new_data_key(path: Path, secret: Secret) -> bytes:
    """Create a random data key, write it wrapped under ``secret`` to ``path``; return it."""
    data_key = secrets.token_bytes(KEY_BYTES)
    write_wrapped_key(path, secret, data_key)
    return data_key


def write_wrapped_key(path: Path, secret: Secret, data_key: bytes) -> None:
    """Wrap ``data_key`` under ``secret`` and write it atomically to ``path``."""
    salt = secrets.token_bytes(16)
    params = {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    header = {"version": WRAP_VERSION, "kdf": secret.kind, "salt": salt.hex(), **params}
    wrapped = seal(_kek(secret, salt, params), data_key, aad=_aad(header))
    atomic_write_bytes(Path(path), json.dumps({**header, "wrapped": wrapped.hex()}).encode())
    os.chmod(path, 0o600)


# Bounds on a wrapped key's scrypt parameters. The header is authenticated only by the GCM tag,
# checked after the KDF ran: unchecked, a tampered ``p = 10**6`` would hang the unwrap for hours
# and ``n = 2**40`` would exhaust memory before the tampering is noticed.
MAX_SCRYPT_MEMORY = 2**30  # bytes, 128 * n * r (this version writes 128 MiB)
MAX_SCRYPT_WORK = 2**24  # n * r * p (this version writes 2**20)


def _check_kdf_params(path: Path, n: object, r: object, p: object) -> None:
    """Refuse malformed or absurd scrypt parameters before any key derivation runs."""
    if not (
        all(type(v) is int and v >= 1 for v in (n, r, p))
        and n >= 2  # type: ignore[operator]
        and n & (n - 1) == 0  # type: ignore[operator]
        and 128 * n * r <= MAX_SCRYPT_MEMORY  # type: ignore[operator]
        and n * r * p <= MAX_SCRYPT_WORK  # type: ignore[operator]
    ):
        raise WrongKey(
            f"wrapped key {path} has implausible scrypt parameters n={n!r:.40}, r={r!r:.40}, "
            f"p={p!r:.40}: it was tampered with or damaged; restore it from a backup"
        )


def unwrap_data_key(path: Path, secret: Secret) -> bytes:
    """Read ``path`` and unwrap the data key with ``secret``.

    Raises:
        FileNotFoundError: If there is no wrapped key (no store here, or it was forgotten).
        WrongKey: If ``secret`` is wrong or the file was altered (absurd scrypt parameters
            included, refused before any key derivation).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        header = {k: record[k] for k in ("version", "kdf", "salt", "n", "r", "p")}
        wrapped = bytes.fromhex(record["wrapped"])
        salt = bytes.fromhex(header["salt"])
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise WrongKey(
            f"wrapped key {path} is corrupted ({type(err).__name__}); restore it from backup"
        ) from None
    if header["version"] != WRAP_VERSION:
        raise WrongKey(f"wrapped key {path} has version {header['version']}, need {WRAP_VERSION}")
    if header["kdf"] != secret.kind:
        raise WrongKey(f"this store is unlocked with a {header['kdf']}, not a {secret.kind}")
    _check_kdf_params(path, header["n"], header["r"], header["p"])
    params = {"n": header["n"], "r": header["r"], "p": header["p"]}
    try:
        return unseal(_kek(secret, salt, params), wrapped, aad=_aad(header))
    except WrongKey:
        raise WrongKey(
            f"cannot unlock {path.parent}: wrong {secret.kind.replace('-', ' ')}, or the wrapped "
            "key was tampered with"
        ) from None


def shred(path: Path) -> bool:
    """Overwrite ``path`` with random bytes, fsync, then delete it (best effort on SSDs and
    copy-on-write filesystems). Never follows a symbolic link: a link is removed unread and its
    target left untouched; anything but a regular file is refused the same way.

    Returns:
        Whether a regular file's bytes were overwritten (``False``: nothing there, or a link
        or special file that was only unlinked).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError as err:
        if not os.path.islink(path):
            raise
        path.unlink()  # a planted link: removed, its target never opened
        _log_refused(path, err)
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file; refusing to overwrite it")
        remaining = max(info.st_size, 1)
        while remaining:
            remaining -= os.write(fd, secrets.token_bytes(min(remaining, 1 << 20)))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    return True


def _log_refused(path: Path, err: OSError) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "not following the symbolic link %s (%s): the link was removed, its target untouched",
        path,
        err.strerror,
    )
