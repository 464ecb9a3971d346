"""Ed25519 signatures over snapshot indexes, and the trust a node places in them.

Keys are plain files:

* ``NAME.key``: the private key, PKCS#8 PEM, written ``0600``;
* ``NAME.pub``: one line ``warmstart-ed25519 <base64 of the 32-byte key> NAME``.

A node trusts the ``*.pub`` files found in ``$WARMSTART_TRUSTED_KEYS`` (files
or directories, ``:``-separated), else in ``/etc/warmstart/trusted-keys``. As
soon as it trusts one key, it refuses any snapshot that is unsigned, signed by
a key it does not know, or whose signature does not verify; this check runs on
the index, before a single chunk is fetched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import EnvironmentProblem, NotFoundError, Untrusted, UsageError
from warmstart.store.index import ENVELOPE_FORMAT, Envelope, Signature

TRUSTED_KEYS_ENV = "WARMSTART_TRUSTED_KEYS"
REQUIRE_SIGNED_ENV = "WARMSTART_REQUIRE_SIGNED"
DEFAULT_TRUSTED_DIR = Path("/etc/warmstart/trusted-keys")
PUB_TAG = "warmstart-ed25519"
_DOMAIN = f"{ENVELOPE_FORMAT}\n".encode()


def _crypto():  # type: ignore[no-untyped-def]
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EnvironmentProblem(
            "signing needs the 'cryptography' package", hint="pip install 'warmstart[store]'"
        ) from None
    return ed25519, serialization, InvalidSignature


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    name: str
    raw: bytes
    source: str

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def line(self) -> str:
        return f"{PUB_TAG} {base64.b64encode(self.raw).decode()} {self.name}\n"

    @classmethod
    def parse(cls, text: str, *, source: str) -> PublicKey:
        parts = text.strip().split()
        if len(parts) not in (2, 3) or parts[0] != PUB_TAG:
            raise UsageError(
                f"{source} is not a warmstart public key",
                hint=f"expected one line '{PUB_TAG} <base64> NAME' as written by `warmstart key generate`",
            )
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise UsageError(f"{source} holds no 32-byte Ed25519 key", hint="generate it again")
        return cls(parts[2] if len(parts) == 3 else Path(source).stem, raw, source)


@dataclass(frozen=True)
class SigningKey:
    name: str
    pem: bytes

    def public(self) -> PublicKey:
        _ed25519, serialization, _ = _crypto()
        priv = serialization.load_pem_private_key(self.pem, password=None)
        raw = priv.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(self.name, raw, "")

    def sign(self, index: bytes) -> Signature:
        _ed25519, serialization, _ = _crypto()
        priv = serialization.load_pem_private_key(self.pem, password=None)
        value = priv.sign(_DOMAIN + index)
        return Signature(key_id=self.public().key_id, value=base64.b64encode(value).decode())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        ed25519, serialization, _ = _crypto()
        try:
            pem = Path(path).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"no signing key at {path}", hint="create one with `warmstart key generate NAME`"
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot read signing key {path}: {exc.strerror}") from None
        try:
            priv = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            priv = None
        if not isinstance(priv, ed25519.Ed25519PrivateKey):
            raise UsageError(
                f"{path} is not an unencrypted Ed25519 private key",
                hint="pass the NAME.key file written by `warmstart key generate`",
            )
        return cls(Path(path).stem, pem)


def generate(name: str, directory: Path) -> tuple[Path, Path, PublicKey]:
    """Write ``NAME.key`` (0600) and ``NAME.pub`` into ``directory``; refuse to overwrite."""
    ed25519, serialization, _ = _crypto()
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid key name {name!r}", hint="use a plain file name such as 'prod-2026'")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise UsageError(f"{p} already exists", hint="choose another name or remove it first")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = PublicKey(name, raw, str(pub_path))
    pub_path.write_text(pub.line())
    return key_path, pub_path, pub


@dataclass(frozen=True)
class TrustDecision:
    signed: bool
    trusted: bool
    key_id: str | None = None
    key_name: str | None = None


class TrustPolicy:
    """The public keys a node trusts, and whether a signature is required."""

    def __init__(self, keys: list[PublicKey], *, require_signed: bool = False) -> None:
        self.keys = {k.key_id: k for k in keys}
        self.require_signed = require_signed or bool(self.keys)

    @classmethod
    def from_sources(cls, sources: list[Path], *, require_signed: bool = False) -> TrustPolicy:
        keys: list[PublicKey] = []
        for src in sources:
            if src.is_dir():
                files = sorted(src.glob("*.pub"))
            elif src.is_file():
                files = [src]
            else:
                raise UsageError(
                    f"trusted key source {src} does not exist",
                    hint=f"point {TRUSTED_KEYS_ENV} or --trusted-keys at .pub files or a directory of them",
                )
            keys += [PublicKey.parse(f.read_text(), source=str(f)) for f in files]
        return cls(keys, require_signed=require_signed)

    @classmethod
    def from_env(cls, override: list[Path] | None = None, *, require_signed: bool = False) -> TrustPolicy:
        """--trusted-keys, else $WARMSTART_TRUSTED_KEYS, else /etc/warmstart/trusted-keys if present."""
        require_signed = require_signed or os.environ.get(REQUIRE_SIGNED_ENV, "") not in ("", "0")
        if override:
            return cls.from_sources(override, require_signed=require_signed)
        env = os.environ.get(TRUSTED_KEYS_ENV)
        if env:
            return cls.from_sources([Path(p) for p in env.split(os.pathsep) if p], require_signed=require_signed)
        if DEFAULT_TRUSTED_DIR.is_dir():
            return cls.from_sources([DEFAULT_TRUSTED_DIR], require_signed=require_signed)
        return cls([], require_signed=require_signed)

    def check(self, envelope: Envelope, *, what: str) -> TrustDecision:
        """Raise :class:`Untrusted` unless the envelope satisfies this policy."""
        sig = envelope.signature
        if not self.require_signed:
            return TrustDecision(signed=sig is not None, trusted=False, key_id=sig.key_id if sig else None)
        if not self.keys:
            raise Untrusted(
                f"{what}: signatures are required but no trusted keys are configured",
                hint=f"set {TRUSTED_KEYS_ENV} to a directory of .pub files",
            )
        if sig is None:
            raise Untrusted(
                f"{what} is unsigned; this node only restores snapshots signed by a trusted key",
                hint="push it with --sign KEY",
            )
        key = self.keys.get(sig.key_id)
        if key is None:
            raise Untrusted(
                f"{what} is signed by unknown key {sig.key_id}",
                hint=f"add its .pub file to {TRUSTED_KEYS_ENV} if you trust it",
            )
        ed25519, _serialization, InvalidSignature = _crypto()
        try:
            value = base64.b64decode(sig.value, validate=True)
            ed25519.Ed25519PublicKey.from_public_bytes(key.raw).verify(value, _DOMAIN + envelope.index.encode())
        except (InvalidSignature, binascii.Error, ValueError):
            raise Untrusted(
                f"{what} has a signature by {key.name} ({sig.key_id}) that does not verify",
                hint="the index was altered after signing; do not restore it",
            ) from None
        return TrustDecision(signed=True, trusted=True, key_id=sig.key_id, key_name=key.name)
