"""The device itself: routing, services and OTA state, independent of any transport.

:meth:`Device.handle` takes the bytes of one received frame and the channel it came on and returns
what to send back (zero, one or, for some faults, two reply frames as text), or :data:`WRONG_DST` when
the frame was for another device (the transports then do what the protocol says for a dropped frame).
One named fault (``faults.FAULTS``) may be switched on; each bends one rule.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.faultdev import wire
from tests.faultdev.faults import AUTH_ACL, AUTH_REALM, AUTH_USER, FAULTS

__all__ = ["AUTH_NEEDED", "WRONG_DST", "Channel", "Device", "RpcError"]

WRONG_DST = object()
AUTH_NEEDED = object()  # HTTP only: answer 401 with a WWW-Authenticate: Digest challenge
NONCE_MAX_AGE_S = 3600
AUTH_MEMBERS = ("realm", "username", "nonce", "cnonce", "response")
REBOOT_S = 0.5  # how long a reboot keeps the device silent

GETINFO_ORDER = (
    "id", "app", "fw_version", "fw_id", "mg_version", "mg_id", "mac", "arch", "uptime", "public_key",
    "ram_size", "ram_free", "ram_min_free", "fs_size", "fs_free",
)  # fmt: skip

ARGS_FMT = {
    "RPC.List": "",
    "RPC.Describe": "{name: %T}",
    "RPC.Ping": "",
    "Sys.GetInfo": "",
    "Sys.Reboot": "{abort: %B, delay_ms: %d}",
    "Sys.SetDebug": "{udp_log_addr: %Q, level: %d, file_level: %Q}",
    "Config.Get": "{key: %Q, level: %d}",
    "Config.Set": "{key: %Q, config: %T, value: %T, level: %d, save: %B, try_once: %B, reboot: %B}",
    "Config.Save": "{try_once: %B, reboot: %B}",
    "FS.List": "{path: %Q}",
    "FS.Get": "{filename: %Q, offset: %ld, len: %ld}",
    "FS.Put": "{filename: %Q, offset: %ld, data: %V, append: %B}",
    "FS.Remove": "{filename: %Q}",
    "OTA.Status": "",
    "OTA.Begin": "{timeout: %d, commit_timeout: %d, size: %d}",
    "OTA.Write": "{offset: %d, data: %V}",
    "OTA.End": "",
    "OTA.Update": "{url: %T, commit_timeout: %d}",
    "OTA.Commit": "",
    "OTA.Revert": "",
    "OTA.CreateSnapshot": "{set_as_revert: %B, commit_timeout: %d}",
    "OTA.GetBootState": "",
    "OTA.SetBootState": "{active_slot: %d, is_committed: %B, revert_slot: %d, commit_timeout: %d}",
}


class RpcError(Exception):
    """A handler's error reply: ``code`` and ``message`` ("" = no message member)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@dataclass
class Channel:
    """What the device knows about the channel a frame came on."""

    kind: str  # ws, http, serial, tcp, mqtt
    info: str = ""
    user: str | None = None  # HTTP: the user a valid Authorization: Digest header named


@dataclass
class Slot:
    version: str
    build_id: str


@dataclass
class Ota:
    """Boot state and the running update (docs/protocol/ota.md §1)."""

    slots: list[Slot] = field(default_factory=lambda: [Slot("1.0.0", "20260101-000000/base"), Slot("", "")])
    active: int = 0  # the slot running now (and at next boot)
    committed: bool = True
    revert_slot: int = 0
    commit_timeout: int = 0
    state: int = 0  # 0 idle, 1 progress, 2 error, 3 success
    size: int = 0
    buf: bytearray = field(default_factory=bytearray)
    begin_commit_timeout: int = 0


class Device:
    """A Mongoose-OS-like device with one optional fault (``fault=None``: the correct device)."""

    def __init__(
        self,
        fault: str | None = None,
        *,
        device_id: str = "faultdev",
        max_frame_size: int = 4096,
        auth: bool | None = None,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        self.fault = fault
        # Digest auth and the ACL (frames.md §6): on for the auth faults, or when asked.
        self.auth = FAULTS[fault].auth if auth is None and fault is not None else bool(auth)
        self.id = device_id
        self.max_frame_size = max_frame_size
        self.arch = "esp32"
        self.boot_time = time.monotonic()
        self.config: dict[str, Any] = {
            "device": {"id": device_id, "license": "", "mac": "", "public_key": "", "sn": ""},
            "debug": {"level": 2, "file_level": "", "stdout_uart": 0, "stderr_uart": 0},
            "rpc": {
                "enable": True, "http_enable": True, "max_frame_size": max_frame_size, "max_queue_length": 25,
                "auth_domain": "RPC", "auth_file": "",
                "mqtt": {"enable": True, "pub_topic": "%.*s/rpc", "sub_topic": "%.*s/rpc", "sub_wc": True, "qos": 1},
                "uart": {"uart_no": 0, "baud_rate": 115200, "fc_type": 0, "dst": ""},
                "ws": {"enable": True},
            },
        }  # fmt: skip
        self.files: dict[str, bytes] = {"index.html": b"<html>faultdev</html>\n", "conf0.json": b"{}"}
        self.ota = Ota()
        self.crashed = False  # a crashed device answers nothing until it is restarted
        self.deferred: Any = None  # a handler's pending work whose end the reply waits for (OTA.Update)
        self.down_until = 0.0  # while rebooting the device answers nothing
        self.reboot_hooks: list[Callable[[], None]] = []
        self._timers: list[Any] = []
        self.handlers: dict[str, Callable[[Any, Channel], str | None]] = {
            "RPC.List": self._rpc_list,
            "RPC.Describe": self._rpc_describe,
            "RPC.Ping": self._rpc_ping,
            "Sys.GetInfo": self._sys_getinfo,
            "Sys.Reboot": self._sys_reboot,
            "Sys.SetDebug": self._sys_set_debug,
            "Config.Get": self._config_get,
            "Config.Set": self._config_set,
            "Config.Save": self._config_save,
            "FS.List": self._fs_list,
            "FS.Get": self._fs_get,
            "FS.Put": self._fs_put,
            "FS.Remove": self._fs_remove,
            "OTA.Status": self._ota_status,
            "OTA.Begin": self._ota_begin,
            "OTA.Write": self._ota_write,
            "OTA.End": self._ota_end,
            "OTA.Update": self._ota_update,
            "OTA.Commit": self._ota_commit,
            "OTA.Revert": self._ota_revert,
            "OTA.CreateSnapshot": self._ota_snapshot,
            "OTA.GetBootState": self._ota_get_boot_state,
            "OTA.SetBootState": self._ota_set_boot_state,
        }

    def has(self, name: str) -> bool:
        """True when fault ``name`` is the one switched on."""
        return self.fault == name

    # -- routing -------------------------------------------------------------------------------------
    def handle(self, data: bytes, ch: Channel) -> list[str] | object:
        """Replies to one received frame (docs/protocol/frames.md §1-§3)."""
        if self.crashed or self.down:
            return []
        if len(data) > self.max_frame_size and self.has("oversize_crash"):
            self.crashed = True
            return []
        if len(data) > 2048 and self.has("limit_too_small"):
            return []
        doc = wire.parse(data)
        if doc is None:
            return []
        fid = doc.get("id")
        if "id" in doc and (isinstance(fid, bool) or not isinstance(fid, int | float | str)):
            return []
        method = doc.get("method")
        if not isinstance(method, str) or not method:
            if self.has("response_answered") and "id" in doc:
                return [self._encode(doc, ch, error=(404, "No handler for "))]
            return []  # a response: we sent no requests
        if ("v" in doc and self.has("v_rejected")) or (set(doc) - KNOWN and self.has("unknown_member_rejected")):
            return [self._encode(doc, ch, error=(400, "bad request"))] if "id" in doc else []
        dst = doc.get("dst") or ""
        if dst and dst != self.id and self.fault not in ("wrong_dst_answered", f"{ch.kind}_wrong_dst_answered"):
            return WRONG_DST
        params = doc.get("params", doc.get("args"))
        if self.has("args_ignored"):
            params = doc.get("params")
        if self.has("args_win") and "args" in doc:
            params = doc["args"]
        result: str | None = None
        error: tuple[int, str] | None = None
        handler = self._find(method)
        if self.auth and (handler is not None or self.has("acl_before_lookup")):
            denied = self._authorize(doc, method, ch)
            if denied is AUTH_NEEDED:
                return AUTH_NEEDED
            if denied is not None:
                if "id" not in doc and not self.has("auth_notification_answered"):
                    return []
                assert isinstance(denied, tuple)
                return [self._encode(doc, ch, error=denied)]
        if handler is None:
            error = self._not_found(method)
        else:
            try:
                result = handler(params if params is not None else {}, ch)
                if result is None:
                    result = "null"
            except RpcError as e:
                error = (e.code, e.message)
            if self.deferred is not None:
                return self._later_reply(doc, ch, self.deferred)
        if "id" not in doc and self.fault not in ("notification_answered", f"{ch.kind}_notification_answered"):
            return []
        if error is not None and self.has("error_with_result"):
            result = "null"
        return [self._encode(doc, ch, result=result, error=error)]

    # -- auth (frames.md §6) ----------------------------------------------------------------------------
    def challenge(self) -> str:
        """The 401 message: the JSON document mos parses (§6-e), in the device's spacing."""
        nonce = int(time.time())
        if self.has("auth_challenge_order"):
            return f'{{"realm": "{AUTH_REALM}", "auth_type": "digest", "nonce": {nonce}, "nc": 1, "algorithm": "MD5"}}'
        return f'{{"auth_type": "digest", "nonce": {nonce}, "nc": 1, "realm": "{AUTH_REALM}", "algorithm": "MD5"}}'

    def fresh(self, nonce: int) -> bool:
        """§6-k: ``now >= nonce`` and ``now - nonce < 3600``."""
        now = int(time.time())
        if nonce > now:
            return self.has("auth_future_nonce_ok")
        return now - nonce < NONCE_MAX_AGE_S or self.has("auth_stale_nonce_ok")

    @staticmethod
    def ha1() -> str:
        user, password = AUTH_USER
        return hashlib.md5(f"{user}:{AUTH_REALM}:{password}".encode()).hexdigest()

    def _verify(self, auth: Any) -> tuple[str | None, tuple[int, str] | None]:
        """The frame's ``auth`` object: (user or None, error or None) (§6-i, §6-k, §6-l)."""
        bad = (400, "bad request")
        if not isinstance(auth, dict) or any(k not in auth for k in AUTH_MEMBERS):
            return None, (None if self.has("auth_incomplete_401") else bad)
        if "algorithm" not in auth and self.has("auth_algorithm_required"):
            return None, bad
        if auth["realm"] != AUTH_REALM or str(auth.get("algorithm") or "MD5").upper() != "MD5":
            return None, bad
        nonce = auth["nonce"]
        if isinstance(nonce, str) and self.has("auth_string_nonce_refused"):
            return None, bad
        try:
            nonce_i = int(nonce)
        except (TypeError, ValueError):
            return None, bad
        if auth["username"] != AUTH_USER[0] or not self.fresh(nonce_i):
            return None, None
        ha2_text = "POST:/rpc" if self.has("auth_retry_refused") else "dummy_method:dummy_uri"
        ha2 = hashlib.md5(ha2_text.encode()).hexdigest()
        want = hashlib.md5(f"{self.ha1()}:{nonce_i}:1:{auth['cnonce']}:auth:{ha2}".encode()).hexdigest()
        return (AUTH_USER[0], None) if str(auth["response"]).lower() == want else (None, None)

    def _authorize(self, doc: dict[str, Any], method: str, ch: Channel) -> object:
        """None when the ACL lets the request run; else the error (code, message) or AUTH_NEEDED."""
        user = ch.user
        if "auth" in doc:
            verified, err = self._verify(doc["auth"])
            if err is not None:
                return err
            user = verified or user
        low = method.lower()
        entry = next((acl for pat, acl in AUTH_ACL if fnmatch.fnmatchcase(low, pat.lower())), None)
        if entry is None:
            if self.has("acl_unmatched_allowed"):
                return None
            if not self.has("acl_unmatched_challenged"):
                return (403, "unauthorized")
            entry = "+" + AUTH_USER[0]
        if entry in ("*", "+*") or (user is not None and entry == "+" + user):
            return None
        if user is not None:
            return (403, "unauthorized")
        if ch.kind == "http":
            if "id" not in doc and self.has("http_auth_notification_silent"):
                return (401, "")  # the fault: handled like any notification, no 401
            return AUTH_NEEDED
        return (401, self.challenge())

    def http_user(self, header: str, verb: str) -> str | None:
        """The user of a valid ``Authorization: Digest`` header (RFC 2617, qop auth; §6-f), else None."""
        if not header.lower().startswith("digest "):
            return None
        params: dict[str, str] = {}
        for part in header[7:].split(","):
            k, _, v = part.strip().partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        try:
            nonce = int(params.get("nonce", ""), 16)
        except ValueError:
            return None
        if params.get("username") != AUTH_USER[0] or params.get("realm") != AUTH_REALM or not self.fresh(nonce):
            return None
        ha2 = hashlib.md5(f"{verb}:{params.get('uri', '')}".encode()).hexdigest()
        text = f"{self.ha1()}:{params['nonce']}:{params.get('nc', '')}:{params.get('cnonce', '')}:"
        want = hashlib.md5(f"{text}{params.get('qop', '')}:{ha2}".encode()).hexdigest()
        return AUTH_USER[0] if params.get("response", "").lower() == want else None

    def _later_reply(self, doc: dict[str, Any], ch: Channel, work: Any) -> Any:
        """A future of the replies to a request whose answer waits for ``work`` (OTA.Update)."""
        import asyncio

        self.deferred = None

        async def finish() -> list[str]:
            code, message = await work
            if "id" not in doc:
                return []
            error = (code if code < 0 else 0, f"{code} {message}" if code < 0 else message)
            return [self._encode(doc, ch, error=error)]

        if self.has("ota_update_reply_early"):
            self._timers.append(asyncio.ensure_future(finish()))  # its reply is dropped: one came already
            return [self._encode(doc, ch, error=(0, "Update applied, finalizing"))] if "id" in doc else []
        return asyncio.ensure_future(finish())

    def _find(self, method: str) -> Callable[[Any, Channel], str | None] | None:
        if self.has("case_sensitive"):
            return self.handlers.get(method)
        low = method.lower()
        for name, h in self.handlers.items():
            if name.lower() == low:
                return h
        return None

    def _not_found(self, method: str) -> tuple[int, str]:
        if self.has("not_found_code"):
            return (-32601, f"No handler for {method}")
        if self.has("not_found_message"):
            return (404, "Method not found")
        return (404, f"No handler for {method}")

    def _encode(self, doc: dict[str, Any], ch: Channel, **payload: Any) -> str:
        fid = doc.get("id")
        src_in = _text(doc.get("src"))
        dst_in = _text(doc.get("dst"))
        src = dst_in or self.id
        dst = src_in
        tag = _text(doc.get("tag"))
        kw: dict[str, Any] = {}
        if self.has("id_quoted"):
            kw["id_writer"] = lambda v: json.dumps(str(v))
        elif self.has("string_id_bare"):
            kw["id_writer"] = lambda v: str(v)
        elif self.has("negative_id_bare"):
            kw["id_writer"] = lambda v: str(v) if isinstance(v, int) else wire.id_text(v)
        if self.has("wrong_id_echo") and isinstance(fid, int):
            fid += 1
        if self.has("member_order"):
            kw["order"] = ("src", "id", "dst", "tag")
        if self.has("envelope_spaces"):
            kw["sep"] = ", "
        if self.has("tag_dropped"):
            tag = ""
        if self.has("dst_not_set") and ch.kind != "mqtt":
            dst = ""
        if self.has("src_ignores_dst"):
            src = "faultdev-alias" if dst_in else src
        if self.has("mqtt_src_dst_not_swapped") and ch.kind == "mqtt":
            src, dst = src_in, self.id
        return wire.reply(fid, src, dst, tag, **kw, **payload)

    # -- timers and reboots --------------------------------------------------------------------------
    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay_s`` on the running event loop."""
        import asyncio

        self._timers.append(asyncio.get_running_loop().call_later(delay_s, fn))

    @property
    def down(self) -> bool:
        """True while the device is rebooting."""
        return time.monotonic() < self.down_until

    def reboot(self) -> None:
        """Restart: silent for a second, uptime from zero, every connection dropped, update state idle."""
        self.boot_time = time.monotonic()
        self.down_until = self.boot_time + REBOOT_S
        if self.ota.state in (1, 3):
            self.ota.state = 0
        self.ota.buf = bytearray()
        for hook in list(self.reboot_hooks):
            hook()

    def close(self) -> None:
        """Cancel pending timers."""
        for t in self._timers:
            t.cancel()

    # -- built-in services (frames.md §4) ------------------------------------------------------------
    def _method_names(self) -> list[str]:
        names = list(reversed(list(self.handlers)))  # most recently registered first
        if self.has("rpc_list_no_ping"):
            names.remove("RPC.Ping")
        return names

    def _rpc_list(self, p: Any, ch: Channel) -> str:
        names = self._method_names()
        return wire.spaced(names) if self.has("rpc_list_spaced") else wire.compact(names)

    def _rpc_describe(self, p: Any, ch: Channel) -> str:
        name = p.get("name") if isinstance(p, dict) else None
        if not isinstance(name, str) or not name:
            raise RpcError(404 if self.has("describe_missing_404") else 400, "name is required")
        if name not in ARGS_FMT or name not in self.handlers:
            raise RpcError(400 if self.has("describe_unknown_400") else 404, "name not found")
        if self.has("describe_order"):
            return f'{{"args_fmt": {wire.q(ARGS_FMT[name])}, "name": {wire.q(name)}}}'
        return f'{{"name": {wire.q(name)}, "args_fmt": {wire.q(ARGS_FMT[name])}}}'

    def _rpc_ping(self, p: Any, ch: Channel) -> str:
        if self.has("ping_no_channel_info"):
            return wire.spaced({"info": ch.info})
        if self.has("ping_info_wrong"):
            return wire.spaced({"channel_info": f"{ch.kind} channel"})
        return wire.spaced({"channel_info": ch.info})

    def uptime(self) -> int:
        return int(time.monotonic() - self.boot_time)

    def _sys_getinfo(self, p: Any, ch: Channel) -> str:
        slot = self.ota.slots[self.ota.active]
        info: dict[str, Any] = {
            "id": self.id, "app": "faultdev", "fw_version": slot.version, "fw_id": slot.build_id,
            "mg_version": "2.20.0", "mg_id": "20260101-000000", "mac": "02FD00000001", "arch": self.arch,
            "uptime": self.uptime(), "public_key": None, "ram_size": 327680, "ram_free": 200000,
            "ram_min_free": 190000, "fs_size": 262144, "fs_free": 200000,
        }  # fmt: skip
        if self.has("getinfo_no_fw_version"):
            del info["fw_version"]
        if self.has("getinfo_order"):
            info = {"app": info.pop("app"), **info}
        if self.has("getinfo_uptime_string"):
            info["uptime"] = str(info["uptime"])
        if self.has("getinfo_wrong_id"):
            info["id"] = self.id + "-other"
        return wire.spaced(info)[:-1] + ',"wifi": {"sta_ip": "", "ap_ip": "", "status": "disconnected", "ssid": ""}}'

    def _sys_reboot(self, p: Any, ch: Channel) -> str | None:
        delay = p.get("delay_ms", 100) if isinstance(p, dict) else 100
        if not isinstance(delay, int) or delay < 0:
            if not self.has("reboot_negative_accepted"):
                raise RpcError(400, "invalid delay value")
            return None  # the fault: accepted and (harmlessly) ignored
        self.later(delay / 1000, self.reboot)
        return None

    def _sys_set_debug(self, p: Any, ch: Channel) -> str | None:
        """frames.md §4-e: this device has no UDP logging; success is code 0 through the error path."""
        p = p if isinstance(p, dict) else {}
        if p.get("udp_log_addr"):
            raise RpcError(501, "MGOS_ENABLE_DEBUG_UDP is not enabled")
        level = p.get("level")
        bad = level is not None and (not isinstance(level, int) or not -1 <= level <= 4)
        if bad and not self.has("setdebug_level_accepted"):
            raise RpcError(400, "invalid level")
        raise RpcError(0)

    # -- Config ----------------------------------------------------------------------------------------
    def _lookup(self, key: str) -> Any:
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(key)
            node = node[part]
        return node

    def _config_get(self, p: Any, ch: Channel) -> str:
        key = p.get("key") if isinstance(p, dict) else None
        if not key or self.has("config_get_key_ignored"):
            return wire.compact(self.config)
        try:
            value = self._lookup(key)
        except KeyError:
            if self.has("config_unknown_key_null"):
                return "null"
            raise RpcError(404, "invalid config key") from None
        return wire.compact(value)

    def _merge(self, dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                self._merge(dst[k], v)
            elif k in dst:
                dst[k] = v

    def _config_set(self, p: Any, ch: Channel) -> str:
        cfg = p.get("config") if isinstance(p, dict) else None
        if not isinstance(cfg, dict):
            raise RpcError(400, "value is required")
        if not self.has("config_set_ignored"):
            self._merge(self.config, cfg)
        return '{"saved": %s}' % ("true" if isinstance(p, dict) and p.get("save") else "false")

    def _config_save(self, p: Any, ch: Channel) -> str:
        return '{"saved": true}'

    # -- FS ------------------------------------------------------------------------------------------
    def _filename(self, p: Any) -> str:
        name = p.get("filename") if isinstance(p, dict) else None
        if not isinstance(name, str) or not name:
            raise RpcError(500 if self.has("fs_required_500") else 400, "filename is required")
        return name

    def _fs_list(self, p: Any, ch: Channel) -> str:
        names = list(self.files)
        if self.has("fs_list_objects"):
            return wire.compact([{"name": n, "size": len(self.files[n])} for n in names])
        return wire.compact(names)

    def _fs_get(self, p: Any, ch: Channel) -> str:
        name = self._filename(p)
        if name not in self.files:
            if self.has("fs_get_missing_ok"):
                return '{"data": "", "left": 0}'
            raise RpcError(400, f'failed to open file "{name}"')
        data = self.files[name]
        off = p.get("offset", 0) if isinstance(p.get("offset", 0), int) else 0
        ln = p.get("len", -1) if isinstance(p.get("len", -1), int) else -1
        chunk = data[off:] if ln < 0 else data[off : off + ln]
        left = max(0, len(data) - off - len(chunk))
        if self.has("fs_get_left_wrong"):
            left = len(data)
        if self.has("fs_get_offset_ignored"):
            chunk = data[: len(chunk)]
        return f'{{"data": "{base64.b64encode(chunk).decode()}", "left": {left}}}'

    def _fs_put(self, p: Any, ch: Channel) -> str | None:
        name = self._filename(p)
        try:
            data = base64.b64decode(p.get("data", ""), validate=True)
        except (binascii.Error, TypeError):
            raise RpcError(400, "invalid data") from None
        if self.has("fs_put_append_ignored"):
            self.files[name] = data
        elif p.get("append"):
            self.files[name] = self.files.get(name, b"") + data
        else:
            self.files[name] = data
        return None

    def _fs_remove(self, p: Any, ch: Channel) -> str | None:
        name = self._filename(p)
        if self.has("fs_remove_noop"):
            return None
        if self.files.pop(name, None) is None:
            raise RpcError(500, "remove failed")
        return None

    # -- OTA (ota.md §1) -----------------------------------------------------------------------------
    def _ota_status(self, p: Any, ch: Channel) -> str:
        o = self.ota
        state: Any = o.state
        if self.has("ota_status_idle_while_updating") and state == 1:
            state = 0
        if self.has("ota_status_state_string"):
            state = ("idle", "progress", "error", "success")[o.state]
        if self.has("ota_status_state_out_of_range"):
            state = o.state + 7
        committed = json.dumps(int(o.committed) if self.has("ota_status_committed_int") else o.committed)
        msg = ("idle", "progress", "error", "success")[o.state]
        pct = (100 * len(o.buf) // o.size) if o.state == 1 and o.size else 0
        return (
            f'{{"state": {json.dumps(state)}, "msg": "{msg}", "is_committed": {committed}, '
            f'"commit_timeout": {o.commit_timeout}, "partition": {o.active}, "progress_percent": {pct}}}'
        )

    def _ota_begin(self, p: Any, ch: Channel) -> str | None:
        o = self.ota
        if not o.committed and not self.has("ota_begin_uncommitted_ok"):
            raise RpcError(-1, "Previous update has not been committed yet")
        if o.state == 1 and not self.has("ota_begin_while_busy_ok"):
            raise RpcError(-1, "Update already in progress")
        size = p.get("size") if isinstance(p, dict) else None
        if not isinstance(size, int) or size <= 0:
            raise RpcError(-1, "Invalid size")
        o.state, o.size, o.buf = 1, size, bytearray()
        o.begin_commit_timeout = p.get("commit_timeout", 0) if isinstance(p.get("commit_timeout"), int) else 0
        return None

    def _ota_write(self, p: Any, ch: Channel) -> str | None:
        o = self.ota
        if o.state != 1:
            raise RpcError(-1, "No update in progress")
        off = p.get("offset") if isinstance(p, dict) else None
        try:
            chunk = base64.b64decode(p.get("data", ""), validate=True)
        except (binascii.Error, TypeError):
            raise RpcError(-1, "Invalid data") from None
        if not isinstance(off, int) or off < 0:
            raise RpcError(-1, "Invalid offset")
        have = len(o.buf)
        if off == have:
            o.buf += chunk
        elif off < have:
            if self.has("ota_duplicate_rejected"):
                raise RpcError(-1, "Duplicate write")
            if bytes(o.buf[off : off + len(chunk)]) != chunk:
                raise RpcError(-1, "Write does not match data already received")
            if off + len(chunk) > have:
                o.buf += chunk[have - off :]
        else:
            if not self.has("ota_gap_accepted"):
                raise RpcError(-1, f"Write at {off}, expected {have}")
            o.buf += bytes(off - have) + chunk
        if len(o.buf) > o.size:
            o.state = 2
            raise RpcError(-1, "More data than announced")
        return None

    def _bundle_ok(self, data: bytes) -> dict[str, Any] | None:
        """The manifest of a bundle the device accepts (updater.md §1-§2), else None."""
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            if zf.testzip() is not None and not self.has("ota_bad_bundle_accepted"):
                return None
            if any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist()) and not self.has("bundle_deflated_ok"):
                return None  # stored entries only
            names = [n for n in zf.namelist() if n.endswith("manifest.json")]
            if names and names[0] != zf.namelist()[0] and not self.has("bundle_manifest_not_first_ok"):
                return None  # manifest.json must be the first entry
            manifest = json.loads(zf.read(names[0])) if names else None
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, zlib_error()):
            return {"version": "corrupt", "build_id": "corrupt"} if self.has("ota_bad_bundle_accepted") else None
        if not isinstance(manifest, dict):
            return None
        required = ("platform", "parts") if self.has("bundle_missing_version_ok") else ("platform", "version", "parts")
        if any(k not in manifest for k in required):
            return None  # Required manifest field missing
        platform = str(manifest.get("platform", ""))
        if platform.lower() != self.arch.lower() and not self.has("bundle_wrong_platform_ok"):
            return None  # Wrong platform
        return manifest

    def _ota_end(self, p: Any, ch: Channel) -> str | None:
        o = self.ota
        if o.state != 1:
            raise RpcError(-1, "No update in progress")
        if len(o.buf) < o.size:
            o.state = 1 if self.has("ota_abort_stays_progress") else 0
            o.buf = bytearray()
            if self.has("ota_end_early_ok"):
                return None  # the fault: the abort is reported as success
            raise RpcError(-1, "Update aborted")
        data = bytes(o.buf)
        o.buf = bytearray()
        if not self.install(data, o.begin_commit_timeout):
            raise RpcError(-1, "Invalid firmware bundle")
        return None

    def install(self, data: bytes, commit_timeout: int) -> bool:
        """Apply a whole bundle: the other slot gets it and the device reboots into it, uncommitted
        (ota.md §1.4); False (state error) when the bundle is refused."""
        o = self.ota
        manifest = self._bundle_ok(data)
        if manifest is None:
            o.state = 2
            return False
        new = 1 - o.active
        o.slots[new] = Slot(str(manifest.get("version", "?")), str(manifest.get("build_id", "?")))
        if self.has("ota_update_stale_version"):
            o.slots[new] = Slot(o.slots[o.active].version, str(manifest.get("build_id", "?")))
        o.state = 3
        o.begin_commit_timeout = commit_timeout
        if self.has("ota_no_reboot"):
            return True

        def switch() -> None:
            if not self.has("ota_update_same_slot"):
                o.revert_slot = o.active if not self.has("ota_update_wrong_revert_slot") else new
                o.active = new
            else:
                o.revert_slot = o.active
                o.slots[o.active] = o.slots[new]
            o.committed = self.has("ota_update_committed")
            o.commit_timeout = o.begin_commit_timeout
            self.reboot()

        self.later(0.1, switch)
        return True

    def _ota_update(self, p: Any, ch: Channel) -> str | None:
        url = p.get("url") if isinstance(p, dict) else None
        if not isinstance(url, str) or not url:
            if self.has("ota_update_malformed_ok"):
                return None
            raise RpcError(-1, "Malformed request")
        if self.ota.state == 1 or not self.ota.committed:
            raise RpcError(-1, "Failed to init updater")
        ct = p.get("commit_timeout", 0)
        self.deferred = self.pull(url, ct if isinstance(ct, int) and not self.has("ota_update_ct_ignored") else 0)
        return None  # handle() sends the reply when the download is done (ota.md §1.5-c)

    async def pull(self, url: str, commit_timeout: int, *, ignore_same_version: bool = False) -> tuple[int, str]:
        """Download ``url`` (plain HTTP, ``Content-Length``) into the updater, as ota-http-client does
        (ota.md §4): (0, status) when applied (a reboot follows), (1, status) when there was nothing
        to do, (negative result, status) on failure."""
        import asyncio
        import urllib.parse

        o = self.ota
        u = urllib.parse.urlsplit(url)
        o.state = 1
        try:
            try:
                reader, writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 80)
            except OSError:
                return -10, "Failed to connect"
            slot = o.slots[o.active]
            head = f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n"
            if not self.has("ota_update_no_headers"):
                head += f"X-MGOS-Device-ID: {self.id} 02FD00000001\r\n"
                head += f"X-MGOS-FW-Version: {self.arch} {slot.version} {slot.build_id}\r\n"
            try:
                writer.write((head + "\r\n").encode("latin-1"))
                status_head = await reader.readuntil(b"\r\n\r\n")
                lines = status_head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ")[1])
                length = next((int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:")), -1)
                if status == 304:
                    return (-304, "Not Modified") if self.has("ota_update_304_error") else (1, "Not Modified")
                if status != 200:
                    if self.has("ota_update_error_2017"):
                        return -1, "Invalid HTTP response code"
                    return -status, "Invalid HTTP response code"
                if length < 0:
                    return -1, "Invalid content-length, perhaps chunked-encoding"
                data = await reader.readexactly(length)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return -5, "Update failed"
            finally:
                writer.close()
            manifest = self._bundle_ok(data)
            if manifest is None:
                return -1, "Invalid firmware bundle"
            same = (str(manifest.get("version")), str(manifest.get("build_id"))) == (slot.version, slot.build_id)
            if ignore_same_version and same:
                return 1, "Version is the same as current"
            self.install(data, commit_timeout)
            return 0, "Update applied, finalizing"
        finally:
            if o.state == 1:
                o.state = 0

    def http_update(self, what: str) -> bool:
        """``GET /update/commit`` or ``/update/revert`` (ota.md §3): True for 200 Ok, False for 400 Error."""
        if what == "revert" and self.has("http_revert_no_reboot") and not self.ota.committed:
            return True
        if what == "commit" and self.has("http_commit_noop") and not self.ota.committed:
            return True
        try:
            (self._ota_commit if what == "commit" else self._ota_revert)({}, Channel("http"))
        except RpcError:
            return self.has("http_update_commit_ok")
        return True

    def _ota_commit(self, p: Any, ch: Channel) -> str | None:
        o = self.ota
        if o.committed:
            if self.has("ota_commit_twice_ok"):
                return None
            raise RpcError(-1)
        if not self.has("ota_commit_noop"):
            o.committed = True
            o.commit_timeout = 0
        return None

    def _ota_revert(self, p: Any, ch: Channel) -> str | None:
        o = self.ota
        if o.committed:
            if self.has("ota_revert_committed_ok"):
                return None
            raise RpcError(-1)
        if self.has("ota_revert_noop"):
            return None

        def back() -> None:
            o.active, o.revert_slot = o.revert_slot, o.active
            o.committed = True
            o.commit_timeout = 0
            self.reboot()

        self.later(0.1, back)
        return None

    def _ota_snapshot(self, p: Any, ch: Channel) -> str:
        o = self.ota
        if not o.committed:
            raise RpcError(-1, "Cannot create snapshots in uncommitted state")
        new = 1 - o.active
        o.slots[new] = Slot(o.slots[o.active].version, o.slots[o.active].build_id)
        if isinstance(p, dict) and p.get("set_as_revert") and not self.has("ota_snapshot_revert_ignored"):
            o.committed = False
            o.revert_slot = new
            ct = p.get("commit_timeout", -1)
            if isinstance(ct, int) and ct >= 0:
                o.commit_timeout = ct
        slot = o.active if self.has("ota_snapshot_wrong_slot") else new
        return f'{{"slot": {slot}}}'

    def _ota_get_boot_state(self, p: Any, ch: Channel) -> str:
        o = self.ota
        committed: Any = o.committed
        if self.has("bootstate_committed_int"):
            committed = int(committed)
        doc: dict[str, Any] = {
            "active_slot": o.active, "is_committed": committed, "revert_slot": o.revert_slot,
            "commit_timeout": o.commit_timeout,
        }  # fmt: skip
        if self.has("bootstate_no_revert_slot"):
            del doc["revert_slot"]
        return wire.spaced(doc)

    def _ota_set_boot_state(self, p: Any, ch: Channel) -> str | None:
        o = self.ota
        p = p if isinstance(p, dict) else {}
        known = {"active_slot", "is_committed", "revert_slot", "commit_timeout"} & set(p)
        if not known:
            if self.has("ota_set_boot_state_empty_ok"):
                return None
            raise RpcError(-2)
        if self.has("ota_set_boot_state_ignored"):
            return None
        for k in ("active_slot", "revert_slot"):
            if k in p and p[k] not in (0, 1):
                raise RpcError(-3)
        if "active_slot" in p:
            o.active = p["active_slot"]
        if "revert_slot" in p:
            o.revert_slot = p["revert_slot"]
        if "is_committed" in p:
            o.committed = bool(p["is_committed"])
        if isinstance(p.get("commit_timeout"), int) and p["commit_timeout"] >= 0:
            o.commit_timeout = p["commit_timeout"]
        return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


KNOWN = {"v", "id", "src", "dst", "tag", "key", "method", "args", "params", "auth", "result", "error", "nr"}


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error
