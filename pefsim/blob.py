"""ESM blobs: a signed manifest of SHA-512 digests, checked by the UV after page-in.

The real blob is an FDT whose digest node is AES-GCM encrypted under a symmetric key wrapped to a
TPM-resident key (section 3.3 of the protocol reference). pefsim keeps the part that matters for
the life cycle: the digests of the kernel (``kernel-size`` bytes at kbase), the initrd and the
bootargs, and a signature the UV verifies with a key it trusts (Ed25519 instead of the TPM
lockbox). Any bad format, bad signature, missing item or mismatch sends ESM down the abort path.

Wire format::

    b"PEFSIM-ESMB-1\\n" | u32 big-endian manifest length | manifest (JSON) | Ed25519 signature (64)

The signature covers everything before it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pefsim.image import GuestImage
from pefsim.keyfile import write_private

MAGIC = b"PEFSIM-ESMB-1\n"
SIG_LEN = 64
ITEMS = ("kernel", "kernel-size", "initrd", "bootargs")


class BlobError(Exception):
    """The blob fails the UV's check; ``reason`` is a short label (also a metric label value)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    digests: dict
    guest: str


def make_blob(image: GuestImage, key: Ed25519PrivateKey, omit: tuple[str, ...] = (),
              override: dict | None = None) -> bytes:
    """A blob for ``image``; ``omit`` drops items and ``override`` replaces digests (both only
    to make deliberately bad blobs for tests and the demo)."""
    digests = {k: v for k, v in image.digests().items() if k not in omit}
    digests.update(override or {})
    manifest = json.dumps({"format": 1, "guest": image.name, "digests": digests},
                          sort_keys=True).encode()
    body = MAGIC + struct.pack(">I", len(manifest)) + manifest
    return body + key.sign(body)


def parse_blob(blob: bytes) -> tuple[Manifest, bytes, bytes]:
    """Split a blob into (manifest, signed body, signature) or raise BlobError("bad-format")."""
    head = len(MAGIC) + 4
    if len(blob) < head + SIG_LEN or not blob.startswith(MAGIC):
        raise BlobError("bad-format", "no blob magic")
    (n,) = struct.unpack(">I", blob[len(MAGIC):head])
    if head + n + SIG_LEN > len(blob):
        raise BlobError("bad-format", "truncated")
    body, sig = blob[: head + n], blob[head + n: head + n + SIG_LEN]
    try:
        doc = json.loads(body[head:])
        manifest = Manifest(digests=dict(doc["digests"]), guest=str(doc.get("guest", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise BlobError("bad-format", f"manifest: {exc}") from None
    return manifest, body, sig


def measure(data: bytes) -> str:
    """An item's digest as the manifest holds it (SHA-512, hex)."""
    return hashlib.sha512(data).hexdigest()


def new_measurement():
    """A running measurement (``update`` it piece by piece; ``hexdigest`` as ``measure`` gives)."""
    return hashlib.sha512()


def verify_blob(blob: bytes, trusted: Ed25519PublicKey, measured: dict[str, str]) -> Manifest:
    """Check signature and every digest against ``measured`` (item -> the digest of what the UV
    read from secure memory, ``measure``). All items are evaluated, as the real UV does; the
    first failure is raised."""
    manifest, body, sig = parse_blob(blob)
    try:
        trusted.verify(sig, body)
    except InvalidSignature:
        raise BlobError("bad-signature") from None
    failures = []
    for item in ("kernel", "initrd", "bootargs"):
        want = manifest.digests.get(item)
        if want is None:
            failures.append(BlobError(f"missing-{item}"))
        elif measured[item] != want:
            failures.append(BlobError(f"mismatch-{item}"))
    if failures:
        raise failures[0]
    return manifest


def kernel_size(blob: bytes) -> int:
    """The ``kernel-size`` item (needed before the kernel can be measured)."""
    manifest, _, _ = parse_blob(blob)
    try:
        return int(manifest.digests["kernel-size"])
    except (KeyError, ValueError, TypeError):
        raise BlobError("missing-kernel-size") from None


# -- keys --------------------------------------------------------------------------------------

def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_keypair(key: Ed25519PrivateKey, directory: Path, force: bool = False) -> tuple[Path, Path]:
    """esm-signing.key (0600 from its creation: pefsim/keyfile.py) and esm-signing.pub in
    ``directory``. A signing key already there is FileExistsError unless ``force``: every blob
    signed with it stops verifying once it is replaced."""
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True)
    priv = directory / "esm-signing.key"
    pub = directory / "esm-signing.pub"
    write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), replace=force)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:  # a public key, a certificate, a key with a password
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


# An Ed25519 SubjectPublicKeyInfo is one DER encoding (RFC 8410: the algorithm has no parameters):
# this prefix, then the 32-byte key.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The PEM Ed25519 public key at ``path`` (what save_keypair writes; the UV's --trusted-key).
    Read without cryptography's serialization package, which cost the UV ~1 MiB of RSS for one
    key (docs/performance.md, the memory budget); anything else is ValueError."""
    text = Path(path).read_bytes().strip()
    head, tail = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"
    if not (text.startswith(head) and text.endswith(tail)):
        raise ValueError(f"{path}: not a PEM public key")
    try:
        der = base64.b64decode(b"".join(text[len(head):-len(tail)].split()), validate=True)
    except binascii.Error:
        raise ValueError(f"{path}: not a PEM public key (bad base64)") from None
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(der[len(ED25519_SPKI_PREFIX):])
