"""fw.zip signatures: ECDSA P-256 over SHA-256 of manifest.json (spec/updater.md §4.1, §4.3).

Where they live: the manifest entry's local-header *extra field* holds one record with header id
0x293A (bytes ``3A 29``), a 2-byte little-endian length and a JSON object
``{"sig0": "<base64 DER signature>", "sig1": ..., <extra attrs>}``. ``sigN`` is made with the N-th
signing key; the device verifies it with ``update.keyN`` (base64 DER SubjectPublicKeyInfo).

Policy (``update.sig_req_mask``): ``-1`` (any negative value) ignores signatures; otherwise every set
bit must be a valid signature, i.e. ``(result & mask) == mask``. A mask of ``0`` refuses every update,
as the device documentation says (the formula alone would accept everything; the documented
behaviour wins because it is the safe reading).

``cryptography`` is imported only when a key or signature is actually used; without it a
:class:`SigningUnavailable` error says to install the ``sign`` extra.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from updater.errors import MissingExtra, UpdaterError
from updater.manifest import go_json

__all__ = [
    "MAX_KEYS",
    "SIG_EXTRA_ID",
    "SigningUnavailable",
    "generate_key",
    "load_private_key",
    "load_public_key_b64",
    "make_sig_extra",
    "parse_sig_extra",
    "private_key_pem",
    "public_key_b64",
    "sign_manifest",
    "verify_signatures",
]

log = logging.getLogger("mgrpc.updater.signing")

SIG_EXTRA_ID = 0x293A
MAX_KEYS = 8
_EXTRA_HDR = struct.Struct("<HH")


class SigningUnavailable(MissingExtra):
    """The ``cryptography`` package is missing."""

    def __init__(self) -> None:
        super().__init__("Firmware signatures", "cryptography", "sign")


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils
    except ImportError:
        raise SigningUnavailable() from None
    return hashes, serialization, ec, utils


def generate_key() -> Any:
    """A new ECDSA P-256 private key (a ``cryptography`` key object)."""
    _hashes, _ser, ec, _utils = _crypto()
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: Any) -> bytes:
    """Unencrypted SEC1 PEM (``-----BEGIN EC PRIVATE KEY-----``) of a private key: the block type
    ``mos create-fw-bundle --sign-key`` looks for, so keys from ``mgrpc fw keygen`` work with mos too.
    """
    _hashes, ser, _ec, _utils = _crypto()
    return bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, ser.NoEncryption()))


def load_private_key(source: Any) -> Any:
    """A P-256 private key from a key object, PEM/DER bytes, or a path to a PEM/DER file."""
    _hashes, ser, ec, _utils = _crypto()
    if isinstance(source, ec.EllipticCurvePrivateKey):
        return source
    if isinstance(source, str | os.PathLike):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise UpdaterError(f"Cannot read signing key {os.fspath(source)}: {exc.strerror}") from None
    else:
        data = bytes(source)
    try:
        if b"-----BEGIN" in data:
            key = ser.load_pem_private_key(data, password=None)
        else:
            key = ser.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UpdaterError(f"Invalid signing key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UpdaterError("Invalid signing key: must be an ECDSA P-256 (prime256v1) key")
    return key


def public_key_b64(key: Any) -> str:
    """The value for ``update.keyN``: base64 of the DER SubjectPublicKeyInfo of ``key``'s public half."""
    _hashes, ser, ec, _utils = _crypto()
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = pub.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def load_public_key_b64(source: Any) -> str:
    """An ``update.keyN`` value from: a base64 DER public key (returned checked), a key object, or
    PEM/DER bytes or a path of a public or private key file.
    """
    _hashes, ser, ec, _utils = _crypto()
    if isinstance(source, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return public_key_b64(source)
    data: bytes
    if isinstance(source, str) and not os.path.exists(source):
        try:
            der = base64.b64decode(source, validate=True)
            pub = ser.load_der_public_key(der)
        except (ValueError, binascii.Error, TypeError):
            raise UpdaterError(f"Invalid public key {source!r}: not a file nor base64 DER") from None
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise UpdaterError("Invalid public key: not an ECDSA key")
        return public_key_b64(pub)
    if isinstance(source, str | os.PathLike):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise UpdaterError(f"Cannot read key {os.fspath(source)}: {exc.strerror}") from None
    else:
        data = bytes(source)
    if b"PRIVATE KEY" in data:
        return public_key_b64(load_private_key(data))
    try:
        if b"-----BEGIN" in data:
            pub = ser.load_pem_public_key(data)
        else:
            try:
                pub = ser.load_der_public_key(data)
            except ValueError:
                return public_key_b64(load_private_key(data))
    except (ValueError, TypeError) as exc:
        raise UpdaterError(f"Invalid public key: {exc}") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise UpdaterError("Invalid public key: not an ECDSA key")
    return public_key_b64(pub)


def sign_manifest(manifest_bytes: bytes, key: Any) -> str:
    """``sigN``: base64 DER ECDSA signature of SHA-256(manifest_bytes)."""
    hashes, _ser, ec, utils = _crypto()
    key = load_private_key(key)
    digest = hashlib.sha256(manifest_bytes).digest()
    sig = key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    return base64.b64encode(sig).decode("ascii")


def make_sig_extra(sigs: Mapping[int, str] | Sequence[str | None], *, attrs: Mapping[str, Any] | None = None) -> bytes:
    """The 0x293A extra-field record carrying ``{"sig0": ..., ...}`` plus ``attrs`` (compact JSON,
    keys sorted like Go's map encoding). ``sigs`` is indexed by key slot; None/"" slots are omitted.
    """
    items = sigs.items() if isinstance(sigs, Mapping) else enumerate(sigs)
    obj: dict[str, Any] = dict(attrs or {})
    for i, sig in items:
        if sig:
            obj[f"sig{i}"] = sig
    body = go_json({k: obj[k] for k in sorted(obj)}, indent=None).encode("utf-8")
    if len(body) > 0xFFFF:
        raise UpdaterError("Signature record too long")
    return _EXTRA_HDR.pack(SIG_EXTRA_ID, len(body)) + body


def parse_sig_extra(extra: bytes) -> dict[str, Any]:
    """The JSON object of the 0x293A record in a local-header extra field ({} when there is none).

    Raises UpdaterError ``Invalid signature record`` when the record is present but unreadable.
    """
    pos = 0
    while pos + _EXTRA_HDR.size <= len(extra):
        header_id, length = _EXTRA_HDR.unpack_from(extra, pos)
        body = extra[pos + _EXTRA_HDR.size : pos + _EXTRA_HDR.size + length]
        pos += _EXTRA_HDR.size + length
        if header_id != SIG_EXTRA_ID:
            continue
        if len(body) != length:
            raise UpdaterError("Invalid signature record (truncated)")
        try:
            obj = json.loads(body)
        except ValueError:
            raise UpdaterError("Invalid signature record (bad JSON)") from None
        if not isinstance(obj, dict):
            raise UpdaterError("Invalid signature record (not an object)")
        return obj
    return {}


def _key_list(keys: Mapping[int, str | None] | Sequence[str | None]) -> list[tuple[int, str]]:
    items = keys.items() if isinstance(keys, Mapping) else enumerate(keys)
    return [(i, k) for i, k in items if k]


def verify_signatures(
    manifest_bytes: bytes,
    extra: bytes,
    keys: Mapping[int, str | None] | Sequence[str | None],
    sig_req_mask: int,
) -> int:
    """Check ``sigN`` against ``keys[N]`` (base64 DER public keys, ``update.keyN``).

    Returns the result bit mask (bit N = ``sigN`` valid). With ``sig_req_mask`` < 0 nothing is
    enforced; otherwise raises UpdaterError unless ``(result & mask) == mask`` and mask != 0.
    """
    present = _key_list(keys)
    ignore = sig_req_mask < 0
    if ignore and not present:
        return 0
    try:
        result = _check_all(manifest_bytes, extra, present)
    except UpdaterError:
        if ignore:
            return 0
        raise
    if ignore:
        return result
    if sig_req_mask == 0:
        raise UpdaterError("Signature check failed: updates are disabled (update.sig_req_mask is 0)")
    if (result & sig_req_mask) != sig_req_mask:
        missing = [f"sig{i}" for i in range(32) if sig_req_mask & (1 << i) and not result & (1 << i)]
        raise UpdaterError(f"Signature check failed: missing or invalid {', '.join(missing)}")
    log.info("signature check passed: result 0x%x, mask 0x%x", result, sig_req_mask)
    return result


def _check_all(manifest_bytes: bytes, extra: bytes, keys: list[tuple[int, str]]) -> int:
    hashes, ser, ec, utils = _crypto()
    from cryptography.exceptions import InvalidSignature

    sigs = parse_sig_extra(extra)
    digest = hashlib.sha256(manifest_bytes).digest()
    result = 0
    for i, key_b64 in keys:
        if not 0 <= i < MAX_KEYS:
            raise UpdaterError(f"Invalid key slot {i} (0..{MAX_KEYS - 1})")
        try:
            pub = ser.load_der_public_key(base64.b64decode(key_b64, validate=True))
        except (ValueError, binascii.Error, TypeError):
            raise UpdaterError(f"Invalid update.key{i}: not a base64 DER public key") from None
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise UpdaterError(f"Invalid update.key{i}: not an ECDSA public key")
        sig_b64 = sigs.get(f"sig{i}")
        if not isinstance(sig_b64, str):
            continue
        try:
            sig = base64.b64decode(sig_b64, validate=True)
            pub.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except (InvalidSignature, ValueError, binascii.Error):
            log.warning("sig%d does not verify with update.key%d", i, i)
            continue
        result |= 1 << i
    return result
