"""``mgrpc fw build | inspect | keygen``: make, check and sign fw.zip bundles.

``mgrpc fw build`` takes the options of ``mos create-fw-bundle`` (spec/tool.md §6)::

    mgrpc fw build -o fw.zip --platform esp32 --name demo --version 1.0 --build-id 20260101/ci \\
        --attr foo=bar --sign-key k0.pem 'app:src=build/demo.bin,type=app,ptn=app_0' \\
        'fs:src=build/fs.img,type=fs,ptn=fs_0,fs_size=262144' 'nvs:type=nvs,fill=255,size=16384'
    mgrpc fw build -o v.zip --virtual --arch esp32 --fw-version 1.1 --behavior hang
    mgrpc fw build -o app.zip --name demo --version 1.1 --app-dir app/ [--data-dir data/]   # Linux program

Part specs are ``name:prop=value,...`` with mos' value rules: ``true``/``false`` are booleans, an
integer literal (``123``, ``0x1000``, ``0755`` octal) within 32 bits is a number, ``'..'``/``".."``
quote a string, anything else is a string.

``mgrpc fw inspect fw.zip [--key K]...`` streams the bundle through the device's zip parser, prints the
manifest and every entry, checks each part's size, SHA-1, SHA-256 and CRC, and verifies signatures
(``--key`` = base64 DER public key, or a PEM/DER public or private key file; the N-th ``--key`` is
``update.keyN``, or ``--key N=K`` picks the slot). Exit status 1 with ``Error: <reason>`` when anything
is wrong.

``mgrpc fw keygen -o key.pem`` writes a new ECDSA P-256 private key and prints the ``update.keyN``
value (base64 DER public key).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import posixpath
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from updater.errors import UpdaterError
from updater.manifest import manifest_object, read_manifest

__all__ = ["parse_part_spec", "parse_prop_value", "register"]

_OCTAL = re.compile(r"[+-]?0[0-7]+")
_INT = re.compile(r"[+-]?(0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|[1-9][0-9_]*|0)")
_MANIFEST_FIELDS = ("name", "platform", "description", "version", "build_id", "build_timestamp", "parts")


def _out(*parts: object) -> None:
    print(*parts, flush=True)


def _os_text(exc: OSError) -> str:
    """``name: reason`` for a file error (not Python's ``[Errno 2] ...: 'name'``)."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _fail(message: str) -> int:
    from mgrpc.cli._common import CliError, report_error

    return report_error(CliError(message))


def parse_prop_value(v: str) -> Any:
    """A part property value, typed the way mos' ``PartFromString`` does."""
    if v == "":
        return ""
    if v in ("true", "false"):
        return v == "true"
    if len(v) >= 2 and v[0] == v[-1] == "'":
        return v[1:-1].replace("\\'", "'")
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1].replace('\\"', '"')
    n: int | None = None
    if _OCTAL.fullmatch(v):
        n = int(v, 8)
    elif _INT.fullmatch(v):
        n = int(v, 0)
    if n is not None and -(2**31) <= n < 2**31:
        return n
    return v


def parse_part_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name:prop=value,...`` -> (name, props). Raises UpdaterError with mos' wording."""
    name, colon, rest = spec.partition(":")
    if not colon or not name:
        raise UpdaterError(f"invalid part spec '{spec}', must be 'name:prop=value,...'")
    props: dict[str, Any] = {}
    for prop in rest.split(","):
        if not prop:
            break  # mos stops at the first empty property
        key, eq, value = prop.partition("=")
        if not eq:
            raise UpdaterError(f"invalid property spec '{prop}', must be 'prop=value'")
        props[key] = parse_prop_value(value)
    return name, props


def _kv_list(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UpdaterError(f"invalid {what} '{item}', must be 'key=value'")
        out[key] = parse_prop_value(value)
    return out


# -- build ---------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    """Run ``mgrpc fw build``."""
    from updater.bundle import BundlePart, write_bundle, write_virtual_bundle

    try:
        attrs = _kv_list(args.attr, "attr")
        sig_attrs = _kv_list(args.extra_attr, "extra attr")
        build_info: dict[str, Any] = {}
        if args.build_info:
            try:
                build_info = json.loads(Path(args.build_info).read_text())
            except (OSError, ValueError) as exc:
                return _fail(f"cannot read build info {args.build_info}: {exc}")
            if not isinstance(build_info, dict):
                return _fail(f"build info {args.build_info} is not a JSON object")
        sign_keys = [k or None for k in args.sign_key or []]
        common: dict[str, Any] = {
            "sign_keys": sign_keys,
            "sig_attrs": sig_attrs or None,
            "compress": args.compress,
            "dir_prefix": args.dir_prefix,
        }
        if args.virtual:
            build_id = args.build_id or attrs.get("build_id") or build_info.get("build_id")
            if args.parts:
                return _fail("--virtual makes its own parts; give no part specs")
            arch = args.arch or args.platform
            version = args.fw_version or args.version
            if not arch or not version:
                return _fail("--virtual needs --arch and --fw-version")
            fs_files = {}
            for item in args.fs_file or []:
                fname, eq, path = item.partition("=")
                if not eq:
                    return _fail(f"invalid --fs-file '{item}', must be 'name=path'")
                fs_files[fname] = Path(path).read_bytes()
            vkw: dict[str, Any] = {"behavior": args.behavior, "build_id": build_id, **common}
            if args.app_size is not None:
                vkw["app_size"] = args.app_size
            if args.fs_size is not None:
                vkw["fs_size"] = args.fs_size
            if fs_files:
                vkw["fs_files"] = fs_files
            if args.name:
                vkw["name"] = args.name
            extra_attrs = {k: v for k, v in attrs.items() if k not in _MANIFEST_FIELDS}
            if extra_attrs:
                vkw["attrs"] = extra_attrs
            with _atomic_output(args.output) as f:
                manifest = write_virtual_bundle(f, arch, version, **vkw)
        else:
            obj, parts = _base_bundle(args)
            # Precedence as in mos: base manifest < flags < --build-info < part specs < --attr; then
            # mgrpc's own --version/--build-id/--build-timestamp flags.
            for key, value in (("name", args.name), ("platform", args.platform), ("description", args.description)):
                if value:
                    obj[key] = value
            if build_info:
                obj.update(
                    version=build_info.get("build_version", ""),
                    build_id=build_info.get("build_id", ""),
                    build_timestamp=build_info.get("build_timestamp", ""),
                )
            for spec in args.parts:
                pname, props = parse_part_spec(spec)
                src = props.get("src")
                if src in (None, ""):
                    props.pop("src", None)
                    data = None
                else:
                    data = _src_path(str(src), args.src_dir)
                parts[pname] = BundlePart(pname, data, props)
            for tree, pname in ((args.app_dir, "app"), (args.data_dir, "fs")):
                if tree:
                    # A Linux program (mgrpc supervise): the part is a tar of the directory.
                    from updater.fsslots import pack_tree

                    tar = io.BytesIO()
                    pack_tree(tree, tar)
                    parts[pname] = BundlePart(pname, tar.getvalue(), {"type": pname, "src": f"{pname}.tar"})
                    if not obj.get("platform"):
                        obj["platform"] = "linux"
            obj.update(attrs)
            for key, value in (
                ("version", args.version),
                ("build_id", args.build_id),
                ("build_timestamp", args.build_timestamp),
            ):
                if value:
                    obj[key] = value
            if not obj.get("platform"):
                return _fail("--platform is required")
            if not obj.get("version"):
                return _fail("--version is required (or --build-info with build_version)")
            with _atomic_output(args.output) as f:
                manifest = write_bundle(
                    f,
                    platform=str(obj["platform"]),
                    version=str(obj["version"]),
                    name=str(obj.get("name") or ""),
                    build_id=str(obj.get("build_id") or "") or None,
                    build_timestamp=str(obj.get("build_timestamp") or "") or None,
                    description=str(obj.get("description") or "") or None,
                    attrs={k: v for k, v in obj.items() if k not in _MANIFEST_FIELDS},
                    parts=list(parts.values()),
                    **common,
                )
    except UpdaterError as exc:
        return _fail(exc.message)
    except OSError as exc:
        return _fail(_os_text(exc))
    print(
        f"Wrote {args.output}: {manifest.name or '-'} {manifest.version} for {manifest.platform}, "
        f"{len(manifest.parts)} parts",
        file=sys.stderr,
    )
    return 0


def _src_path(src: str, src_dir: str | None) -> Path:
    path = Path(src)
    return path if path.is_absolute() or not src_dir else Path(src_dir) / path


def _base_bundle(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest object and parts to start from: ``--input`` bundle and/or ``--manifest`` file."""
    from updater.bundle import BundlePart

    obj: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    if args.input:
        try:
            with zipfile.ZipFile(args.input) as z:
                blobs = {posixpath.basename(n): z.read(n) for n in z.namelist() if not n.endswith("/")}
                try:
                    obj = read_manifest(z)
                except UpdaterError as exc:
                    raise UpdaterError(f"{args.input}: {exc}") from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise UpdaterError(f"failed to read input bundle {args.input}: {exc}") from None
    if args.manifest:
        try:
            obj = manifest_object(Path(args.manifest).read_bytes(), args.manifest)
        except OSError as exc:
            raise UpdaterError(f"error reading manifest {args.manifest}: {exc.strerror}") from None
    parts: dict[str, Any] = {}
    raw_parts = obj.pop("parts", None) or {}
    if not isinstance(raw_parts, dict):
        raise UpdaterError("manifest parts must be an object")
    src_dir = args.src_dir or (str(Path(args.manifest).parent) if args.manifest else None)
    for pname, pobj in raw_parts.items():
        if not isinstance(pobj, dict):
            raise UpdaterError(f"manifest part {pname} must be an object")
        pobj = dict(pobj)
        src = pobj.get("src")
        data: Any = None
        if src:
            base = posixpath.basename(str(src))
            if base in blobs:
                data = blobs[base]
            elif args.manifest:
                data = _src_path(str(src), src_dir)
            else:
                raise UpdaterError(f"{pname}: {src} not found in the archive")
        parts[pname] = BundlePart(pname, data, pobj)
    return obj, parts


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[BinaryIO]:
    """Write to a temporary name and rename on success, so a failed build leaves no half bundle."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


# -- inspect ---------------------------------------------------------------------------------------


def _parse_keys(values: list[str] | None) -> dict[int, str]:
    from updater.signing import MAX_KEYS, load_public_key_b64

    keys: dict[int, str] = {}
    for i, value in enumerate(values or []):
        slot = i
        m = re.fullmatch(r"(\d+)=(.+)", value, re.S)
        if m and not os.path.exists(value):
            slot, value = int(m.group(1)), m.group(2)
        if not 0 <= slot < MAX_KEYS:
            raise UpdaterError(f"key slot {slot} out of range 0..{MAX_KEYS - 1}")
        keys[slot] = load_public_key_b64(value)
    return keys


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run ``mgrpc fw inspect`` (the checks are :func:`updater.inspection.inspect_bundle`; this prints)."""
    from updater.inspection import inspect_bundle
    from updater.manifest import MANIFEST_FILE_NAME

    try:
        keys = _parse_keys(args.key)
        report = inspect_bundle(
            args.file, arch=args.arch, keys=keys, sig_req_mask=args.sig_req_mask,
            allow_deflate=args.allow_compressed, require_build_id=args.require_build_id,
        )  # fmt: skip
    except UpdaterError as exc:
        return _fail(exc.message)
    except OSError as exc:
        return _fail(_os_text(exc))

    _out(f"{args.file}: {len(report.entries)} entries, {report.file_size} bytes")
    _out(f"{MANIFEST_FILE_NAME}:")
    _out(report.manifest_raw.decode("utf-8", "replace"))
    if not report.manifest.build_id:
        _out("note: no build_id (devices older than mgrpc's rule refuse such bundles)")
    _out("entries:")
    for e in report.entries:
        line = f"  {e.full_name:<32} {e.size:>10}  crc {e.crc32:08x}  {e.method_name}"
        if e.role == "manifest":
            _out(line + "  (manifest)")
        elif e.role == "part":
            _out(line + f"  part {e.part}: " + ", ".join(e.checks))
        else:
            _out(line + "  (no part: ignored by devices)")
    _out("signatures: " + (", ".join(report.signatures) if report.signatures else "none"))
    for i, valid in (report.key_results or {}).items():
        _out(f"  sig{i} with key{i}: {'valid' if valid else 'NOT VALID'}")
    if report.problems:
        return _fail("; ".join(report.problems))  # one line, every problem
    _out("OK")
    return 0


# -- keygen ----------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """Run ``mgrpc fw keygen``."""
    from updater.signing import generate_key, private_key_pem, public_key_b64

    path = Path(args.output)
    if path.exists() and not args.force:
        return _fail(f"{path} exists (use --force to overwrite)")
    try:
        key = generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_pem(key))
    except UpdaterError as exc:
        return _fail(exc.message)
    except OSError as exc:
        return _fail(_os_text(exc))
    pub = public_key_b64(key)
    if args.pub_out:
        Path(args.pub_out).write_text(pub + "\n")
    print(f"Wrote private key to {path}; public key (update.keyN value):", file=sys.stderr)
    _out(pub)
    return 0


# -- registration ----------------------------------------------------------------------------------


def _size_arg(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmM]i?[bB]?)?", text.strip())
    if not m:
        try:
            return int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 65536, 0x10000, 64k, 1M)") from None
    mult = {"k": 1024, "m": 1 << 20}.get((m.group(2) or " ")[0].lower(), 1)
    return int(m.group(1)) * mult


def register(sub: Any) -> None:
    """Add the ``fw`` command with ``build``, ``inspect`` and ``keygen``."""
    p = sub.add_parser(
        "fw",
        help="build, inspect and sign fw.zip bundles",
        description="Build (like `mos create-fw-bundle`), inspect/verify, and make signing keys for fw.zip bundles.",
    )
    fw_sub = p.add_subparsers(dest="fw_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 1)[1])

    b = fw_sub.add_parser(
        "build",
        help="build a fw.zip (like mos create-fw-bundle)",
        description="Build a fw.zip the way `mos create-fw-bundle` does, or a virtual-device bundle with --virtual.",
    )
    b.add_argument("-o", "--output", required=True, help="output zip file")
    b.add_argument("--platform", help="manifest platform (device arch), e.g. esp32")
    b.add_argument("--name", help="manifest name (app name)")
    b.add_argument("--version", help="manifest version")
    b.add_argument("--build-id", help="manifest build_id (omitted when not given, as mos does)")
    b.add_argument("--build-timestamp", help="manifest build_timestamp (RFC 3339)")
    b.add_argument("--build-info", help="JSON file with build_id, build_timestamp, build_version")
    b.add_argument("--description", help="manifest description")
    b.add_argument("--attr", action="append", metavar="K=V", help="extra manifest attribute (repeatable)")
    b.add_argument("--extra-attr", action="append", metavar="K=V", help="extra key of the signature record")
    b.add_argument("--sign-key", action="append", metavar="KEY.PEM", help="ECDSA P-256 key for sigN (repeatable)")
    b.add_argument("--compress", action="store_true", help="deflate entries (devices cannot read these)")
    b.add_argument("--dir-prefix", help="put entries under this directory (devices strip it)")
    b.add_argument("-i", "--input", help="start from this existing fw.zip (its manifest and files)")
    b.add_argument("--manifest", help="start from this manifest.json (part src relative to --src-dir or its dir)")
    b.add_argument("--src-dir", help="directory for relative part src paths")
    b.add_argument("parts", nargs="*", metavar="PART", help="part spec name:src=path,type=..,prop=value,...")
    lx = b.add_argument_group("Linux programs (mgrpc supervise)")
    lx.add_argument("--app-dir", metavar="DIR", help="the app part: a tar of this program directory (platform linux)")
    lx.add_argument("--data-dir", metavar="DIR", help="the fs part: a tar of this data directory (e.g. conf0.json)")
    v = b.add_argument_group("virtual-device bundles")
    v.add_argument("--virtual", action="store_true", help="make a bundle for the virtual device")
    v.add_argument("--arch", help="device arch (the manifest platform)")
    v.add_argument("--fw-version", help="firmware version")
    v.add_argument("--behavior", default="ok", choices=("ok", "crash", "hang", "no_commit"))
    v.add_argument("--app-size", type=_size_arg, help="app image size (e.g. 64k, 1M)")
    v.add_argument("--fs-size", type=_size_arg, help="fs image size, multiple of 4096")
    v.add_argument("--fs-file", action="append", metavar="NAME=PATH", help="file to put into the fs image")
    b.set_defaults(func=cmd_build)

    i = fw_sub.add_parser(
        "inspect",
        help="print and verify a fw.zip",
        description="Print the manifest and entries of a fw.zip, check sizes, SHA-1/SHA-256 and CRCs, and "
        "verify signatures. Exit status 1 on any problem.",
    )
    i.add_argument("file", help="fw.zip to inspect")
    i.add_argument(
        "--key", action="append", metavar="KEY", help="public key for sigN: base64 DER or key file; N=KEY sets the slot"
    )
    i.add_argument("--sig-req-mask", type=lambda s: int(s, 0), help="required signatures (default: all --key slots)")
    i.add_argument("--arch", help="also check the bundle is for this device arch")
    i.add_argument("--allow-compressed", action="store_true", help="accept deflated entries")
    i.add_argument("--require-build-id", action="store_true", help="refuse a manifest without build_id")
    i.set_defaults(func=cmd_inspect)

    k = fw_sub.add_parser("keygen", help="make an ECDSA P-256 signing key", description=cmd_keygen.__doc__)
    k.add_argument("-o", "--output", required=True, help="private key file to write (PEM, mode 0600)")
    k.add_argument("--pub-out", help="also write the base64 public key to this file")
    k.add_argument("--force", action="store_true", help="overwrite an existing key file")
    k.set_defaults(func=cmd_keygen)
