"""Tests for updater.signing: ECDSA P-256 manifest signatures in the 0x293A extra field."""

from __future__ import annotations

import base64
import builtins
import json
import struct
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cryptography")

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from updater import signing
from updater.bundle import BundlePart, build_bundle
from updater.errors import UpdaterError
from updater.signing import (
    SIG_EXTRA_ID,
    SigningUnavailable,
    generate_key,
    load_private_key,
    make_sig_extra,
    parse_sig_extra,
    private_key_pem,
    public_key_b64,
    sign_manifest,
    verify_signatures,
)
from updater.zipstream import EntryData, EntryStart, ZipStreamParser

MANIFEST = b'{\n "platform": "esp32",\n "version": "1.0",\n "parts": {}\n}'


@pytest.fixture(scope="module")
def keys() -> list[Any]:
    return [generate_key() for _ in range(3)]


def test_signature_is_ecdsa_over_sha256_of_exact_bytes(keys: list[Any]) -> None:
    sig = base64.b64decode(sign_manifest(MANIFEST, keys[0]))
    assert sig[0] == 0x30  # DER SEQUENCE
    # Verifiable with the standard (non-prehashed) API over the manifest bytes.
    keys[0].public_key().verify(sig, MANIFEST, ec.ECDSA(hashes.SHA256()))


def test_public_key_is_base64_der_spki(keys: list[Any]) -> None:
    der = base64.b64decode(public_key_b64(keys[0]))
    assert der[0] == 0x30 and len(der) == 91  # P-256 SubjectPublicKeyInfo
    assert public_key_b64(keys[0].public_key()) == public_key_b64(keys[0])


def test_extra_record_format(keys: list[Any]) -> None:
    extra = make_sig_extra([sign_manifest(MANIFEST, keys[0]), None, "c2ln"], attrs={"z": 1})
    assert extra[:2] == b"\x3a\x29"
    (length,) = struct.unpack_from("<H", extra, 2)
    body = extra[4:]
    assert length == len(body)
    obj = json.loads(body)
    assert list(obj) == ["sig0", "sig2", "z"]
    assert b" " not in body  # compact JSON
    assert parse_sig_extra(b"\x01\x02\x00\x00" + extra) == obj  # other records skipped
    assert SIG_EXTRA_ID == 0x293A


def test_parse_sig_extra_edge_cases() -> None:
    assert parse_sig_extra(b"") == {}
    assert parse_sig_extra(b"\x55\x54\x01\x00x") == {}
    with pytest.raises(UpdaterError, match="truncated"):
        parse_sig_extra(b"\x3a\x29\x10\x00{}")
    with pytest.raises(UpdaterError, match="bad JSON"):
        parse_sig_extra(b"\x3a\x29\x02\x00{x")
    with pytest.raises(UpdaterError, match="not an object"):
        parse_sig_extra(b"\x3a\x29\x02\x00[]")


def test_verify_result_bits(keys: list[Any]) -> None:
    extra = make_sig_extra([sign_manifest(MANIFEST, keys[0]), None, sign_manifest(MANIFEST, keys[2])])
    pubs = [public_key_b64(k) for k in keys]
    assert verify_signatures(MANIFEST, extra, pubs, -1) == 0b101
    assert verify_signatures(MANIFEST, extra, pubs, 0b101) == 0b101
    assert verify_signatures(MANIFEST, extra, pubs, 0b001) == 0b101
    assert verify_signatures(MANIFEST, extra, {2: pubs[2]}, 0b100) == 0b100
    # A signature checked with the wrong key is just not valid.
    assert verify_signatures(MANIFEST, extra, [pubs[1], pubs[0], pubs[2]], -1) == 0b100
    with pytest.raises(UpdaterError, match="missing or invalid sig1"):
        verify_signatures(MANIFEST, extra, pubs, 0b011)


def test_verify_detects_modified_manifest(keys: list[Any]) -> None:
    extra = make_sig_extra([sign_manifest(MANIFEST, keys[0])])
    pub = [public_key_b64(keys[0])]
    assert verify_signatures(MANIFEST, extra, pub, 1) == 1
    with pytest.raises(UpdaterError, match="Signature check failed"):
        verify_signatures(MANIFEST + b" ", extra, pub, 1)
    with pytest.raises(UpdaterError, match="sig0"):
        verify_signatures(MANIFEST, b"", pub, 1)
    bad = make_sig_extra(["!!notbase64!!"])
    with pytest.raises(UpdaterError):
        verify_signatures(MANIFEST, bad, pub, 1)


def test_mask_policy(keys: list[Any]) -> None:
    extra = make_sig_extra([sign_manifest(MANIFEST, keys[0])])
    pub = [public_key_b64(keys[0])]
    # -1: ignored, even with no keys or a garbage key.
    assert verify_signatures(MANIFEST, b"", [], -1) == 0
    assert verify_signatures(MANIFEST, extra, ["garbage"], -1) == 0
    # 0: every update refused (documented device behaviour).
    with pytest.raises(UpdaterError, match="disabled"):
        verify_signatures(MANIFEST, extra, pub, 0)
    # A required slot with no key configured can never pass.
    with pytest.raises(UpdaterError, match="sig1"):
        verify_signatures(MANIFEST, extra, pub, 0b10)


def test_invalid_public_key(keys: list[Any]) -> None:
    extra = make_sig_extra([sign_manifest(MANIFEST, keys[0])])
    with pytest.raises(UpdaterError, match=r"Invalid update\.key0"):
        verify_signatures(MANIFEST, extra, ["not base64!"], 1)
    with pytest.raises(UpdaterError, match=r"Invalid update\.key0"):
        verify_signatures(MANIFEST, extra, [base64.b64encode(b"\x30\x03abc").decode()], 1)


def test_key_pem_roundtrip(tmp_path: Path, keys: list[Any]) -> None:
    pem = private_key_pem(keys[0])
    assert pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")  # what mos --sign-key reads
    path = tmp_path / "k.pem"
    path.write_bytes(pem)
    pkcs8 = keys[0].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = keys[0].private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    for source in (pem, path, str(path), keys[0], pkcs8, der):
        assert public_key_b64(load_private_key(source)) == public_key_b64(keys[0])
    with pytest.raises(UpdaterError, match="Invalid signing key"):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    with pytest.raises(UpdaterError, match="Cannot read signing key"):
        load_private_key(tmp_path / "missing.pem")


def test_non_p256_key_refused() -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(UpdaterError, match="P-256"):
        load_private_key(private_key_pem(other))


def _manifest_and_extra(data: bytes) -> tuple[bytes, bytes]:
    p = ZipStreamParser()
    p.feed(data)
    extra = b""
    body = b""
    for ev in p.events():
        if isinstance(ev, EntryStart):
            if ev.name != "manifest.json":
                break
            extra = ev.extra
        elif isinstance(ev, EntryData):
            body += ev.data
    return body, extra


def test_signed_bundle_end_to_end(keys: list[Any], tmp_path: Path) -> None:
    pem1 = tmp_path / "k1.pem"
    pem1.write_bytes(private_key_pem(keys[1]))
    data = build_bundle(
        platform="esp32",
        version="1.0",
        parts=[BundlePart("app", b"app-data", {"type": "app"})],
        sign_keys=[keys[0], pem1],
        sig_attrs={"note": "x"},
    )
    manifest, extra = _manifest_and_extra(data)
    assert parse_sig_extra(extra)["note"] == "x"
    pubs = [public_key_b64(keys[0]), public_key_b64(keys[1]), public_key_b64(keys[2])]
    assert verify_signatures(manifest, extra, pubs, 0b011) == 0b011
    with pytest.raises(UpdaterError):
        verify_signatures(manifest, extra, pubs, 0b111)


def test_skipped_slot_in_bundle(keys: list[Any]) -> None:
    data = build_bundle(platform="p", version="1", parts=[BundlePart("a", b"x")], sign_keys=[None, keys[1]])
    manifest, extra = _manifest_and_extra(data)
    assert set(parse_sig_extra(extra)) == {"sig1"}
    assert verify_signatures(manifest, extra, [None, public_key_b64(keys[1])], 0b10) == 0b10


def test_missing_cryptography_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("cryptography"):
            raise ImportError("no cryptography")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(SigningUnavailable, match=r"mgrpc\[sign\]") as exc:
        signing.generate_key()
    assert isinstance(exc.value, ImportError) and isinstance(exc.value, UpdaterError)
    with pytest.raises(SigningUnavailable):
        verify_signatures(MANIFEST, b"", ["a2V5"], 1)
    # Ignored signatures never need the package.
    assert verify_signatures(MANIFEST, b"", [], -1) == 0
    # Unsigned bundles never need it either.
    assert build_bundle(platform="p", version="1", parts=[BundlePart("a", b"x")])


def test_load_public_key_b64(tmp_path: Path, keys: list[Any]) -> None:
    from updater.signing import load_public_key_b64

    want = public_key_b64(keys[0])
    pub = keys[0].public_key()
    pub_pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pub_pem)
    (tmp_path / "priv.pem").write_bytes(private_key_pem(keys[0]))
    for source in (want, keys[0], pub, pub_pem, pub_der, tmp_path / "pub.pem", str(tmp_path / "priv.pem")):
        assert load_public_key_b64(source) == want
    with pytest.raises(UpdaterError, match="Invalid public key"):
        load_public_key_b64("bm90IGEga2V5")
    with pytest.raises(UpdaterError, match="Invalid public key"):
        load_public_key_b64(b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n")
