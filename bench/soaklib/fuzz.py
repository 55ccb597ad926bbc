"""Fuzzing of every decoder of the stack and of the router, with generated and mutated inputs.

Each *target* takes one input and runs it through the code a transport runs on received bytes:

* ``serial``: the device's rpc-uart decoder (``\"\"\"`` and newline framing, CRC, handshake, ASCII-only)
  and the host's mos decoder with CRC, the input split at random points; every frame is parsed and
  its reply encoded in both styles;
* ``tcp``: the same decoders without CRC, and the binary (length-prefixed msgpack) stream decoder;
* ``http``: a ws message or HTTP body -> JSON frame, re-encoded (device, mos and HTML-escaped styles);
* ``mqtt``: a payload on ``<id>/rpc`` or ``<id>/rpc/<Method>`` as the MQTT device decodes it;
* ``ble``: a sequence of writes to ``tx_ctl`` and ``data`` of the rpc-gatts receiver, then the frame;
* ``msgpack``: one msgpack message through :class:`rpc.codec.MsgpackCodec`, re-encoded;
* ``router``: a frame delivered on a loopback channel to a virtual device's node (every service, in
  memory), so handlers get fuzzed params too.

An input *fails* when it raises anything but the package's own errors (``rpc.errors.MgrpcError``),
when the router logs an unexpected exception, or when it takes longer than the per-input bound (a
hang). Failing inputs are reported with their bytes (hex) so they can become regression tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from rpc.codec import MsgpackCodec
from rpc.errors import MgrpcError
from rpc.frame import ErrorInfo, Frame, parse_frame
from rpc.framing import (
    BinaryStreamDecoder,
    DeviceStreamDecoder,
    FrameBytes,
    MosStreamDecoder,
    MosStreamEncoder,
)
from transports.ble_proto import FrameReceiver, encode_length

__all__ = ["TARGETS", "FuzzResult", "run_target"]

HANG_S = 5.0  # per-input bound; the slowest legitimate input takes milliseconds (more on a busy machine)


class Hang(BaseException):
    """Raised by the alarm when one input runs past :data:`HANG_S`."""


# -- input material -------------------------------------------------------------------------------------

METHODS = [
    "RPC.Ping", "RPC.List", "RPC.Describe", "Sys.GetInfo", "Sys.Reboot", "Config.Get", "Config.Set",
    "Config.Save", "FS.List", "FS.ListExt", "FS.Get", "FS.Put", "FS.Remove", "FS.Mkfs", "OTA.Status",
    "OTA.Begin", "OTA.Write", "OTA.End", "OTA.Abort", "OTA.Commit", "OTA.Revert", "OTA.GetBootState",
    "OTA.SetBootState", "OTA.CreateSnapshot", "OTA.Update", "RPC.Nope", "",
]  # fmt: skip
KEYS = ["id", "src", "dst", "method", "params", "args", "result", "error", "tag", "auth", "key", "nr", "v",
        "jsonrpc", "code", "message", "timeout", "deadline"]  # fmt: skip
TOKENS = [
    b'"""', b"\n", b"\r\n", b"\x04", b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\xff", b"\xc3",
    b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"[" * 64, b"{" * 64, b"1e999", b"-0", b"NaN",
    b"Infinity", b"-Infinity", b"null", b"true", b"9" * 400, b"\\u0000", b"\\ud800", b"\\v", b'"id":',
    b'"method":', b'"params":', b'"error":', b'"result":', b'"auth":', b"\x11", b"\x13", b"\t",
    b"%s", b"'", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b" " * 50,
]  # fmt: skip


_SCALARS: list[Any] = [
    0, -1, 1, 2**31, -(2**63), 2**64 + 5, 1.5, -0.0, 1e308, True, False, None, "", "x", "a" * 300,
    "\u0000\u2028\ud7ff", "é€😀", "../../etc/passwd", "/" * 40, "%n%s", "conf0.json", "UEsDBAoAAAAAAA==",
    float("inf"), float("-inf"), float("nan"),
]  # fmt: skip
_PARAM_KEYS = [*KEYS, "offset", "data", "size", "filename", "len", "url", "config", "save", "reboot",
                      "commit_timeout", "slot", "path", "delay_ms", "append", "name", "key", "level"]  # fmt: skip


def gen_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON-ish value: weird numbers, strings, some nesting."""
    r = rng.random()
    if depth > 2 or r < 0.5:
        if r < 0.1:
            return rng.randrange(-(10**6), 10**6)
        if r < 0.15:
            return rng.choice(METHODS)
        return rng.choice(_SCALARS)
    if r < 0.8:
        return {rng.choice(_PARAM_KEYS): gen_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return [gen_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]


def gen_frame(rng: random.Random) -> dict[str, Any]:
    """A frame-shaped object: mostly plausible members, some of the wrong type."""
    obj: dict[str, Any] = {}
    if rng.random() < 0.9:
        obj["id"] = rng.choice([rng.randrange(1, 10**9), gen_value(rng)])
    if rng.random() < 0.7:
        obj["src"] = rng.choice(["mos", "client_1", gen_value(rng)])
    if rng.random() < 0.3:
        obj["dst"] = rng.choice(["dev", "esp32_soak", "", gen_value(rng)])
    if rng.random() < 0.85:
        obj["method"] = rng.choice([*METHODS, gen_value(rng)])
    for key in rng.sample(KEYS, rng.randrange(0, 4)):
        obj[key] = gen_value(rng)
    if rng.random() < 0.5:
        obj["params"] = gen_value(rng)
    if rng.random() < 0.15:  # a digest answer, plausible or not (the authenticator parses it)
        obj["auth"] = {k: v if rng.random() < 0.75 else gen_value(rng) for k, v in (
            ("realm", "RPC"), ("username", "admin"), ("nonce", rng.randrange(1 << 32)),
            ("cnonce", rng.randrange(1 << 32)), ("response", "0" * 32), ("algorithm", "MD5")) if rng.random() < 0.9}
    return obj


def seeds_json() -> list[bytes]:
    """Valid frames: requests for every method, replies, errors, auth, JSON-RPC."""
    out = [
        b'{"id":1,"src":"mos","method":"Sys.GetInfo"}',
        b'{"id":2,"src":"mos","method":"OTA.Write","params":{"offset":0,"data":"UEsDBA=="}}',
        b'{"id":3,"src":"mos","method":"OTA.Begin","params":{"timeout":600,"commit_timeout":60,"size":1000}}',
        b'{"id":4,"src":"mos","method":"FS.Put","params":{"filename":"a.txt","data":"aGk=","append":true}}',
        b'{"id":5,"src":"mos","method":"Config.Set","params":{"config":{"debug":{"level":3}},"save":true}}',
        b'{"id":6,"src":"dev","dst":"mos","result":{"a":[1,2,3]}}',
        b'{"id":7,"src":"dev","dst":"mos","error":{"code":401,"message":"{\\"auth_type\\":\\"digest\\"}"}}',
        b'{"id":8,"src":"mos","method":"RPC.Describe","args":{"name":"Sys.GetInfo"},"tag":"t"}',
        b'{"id":9,"src":"mos","method":"Sys.GetInfo","auth":{"realm":"RPC","username":"u","nonce":1,'
        b'"cnonce":2,"response":"00"}}',
        b'{"jsonrpc":"2.0","id":10,"method":"RPC.Ping","params":[]}',
        b'{"method":"RPC.Ping"}',
        b'{"id":"str-id","src":"x","method":"FS.Get","params":{"filename":"conf0.json","offset":0,"len":10}}',
        b'{"id":11,"src":"mos","method":"OTA.SetBootState","params":{"active_slot":1,"is_committed":false}}',
        b'{"id":12,"src":"mos","method":"OTA.CreateSnapshot","params":{"set_as_revert":true}}',
        b'{"id":13,"src":"mos","method":"FS.Get","params":{"filename":"conf0.json"}}',
        b'{"id":14,"src":"mos","method":"Config.Get","params":{"key":"rpc.max_frame_size"}}',
    ]
    return out


@dataclass
class Mutator:
    """Byte-level mutations: flips, inserts of interesting tokens, deletes, splices, truncations."""

    rng: random.Random
    pool: list[bytes]

    def mutate(self, data: bytes) -> bytes:
        """One mutated copy of ``data`` (1-6 mutations)."""
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 7)):
            op = rng.randrange(9)
            pos = rng.randrange(len(buf) + 1)
            if op == 0 and buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op == 2:
                buf[pos:pos] = rng.choice(TOKENS)
            elif op == 3 and buf:
                end = min(len(buf), pos + rng.randrange(1, 20))
                del buf[pos:end]
            elif op == 4:
                other = rng.choice(self.pool)
                a = rng.randrange(len(other) + 1)
                buf[pos:pos] = other[a : a + rng.randrange(1, 80)]
            elif op == 5:
                del buf[pos:]
            elif op == 6 and buf:
                a = rng.randrange(len(buf))
                piece = buf[a : a + rng.randrange(1, 40)]
                buf[pos:pos] = piece * rng.randrange(1, 4)
            elif op == 7:
                buf[pos:pos] = rng.randbytes(rng.randrange(1, 12))
            else:
                buf[pos:pos] = str(rng.choice([2**53, -(2**63), 10**30, 0.1, -1])).encode()
        return bytes(buf)


def split(rng: random.Random, data: bytes) -> Iterator[bytes]:
    """``data`` in random pieces: whole (most often), random sizes, or one byte at a time."""
    r = rng.random()
    if r < 0.65:
        yield data
    elif r < 0.7 and len(data) < 200:
        for i in range(len(data)):
            yield data[i : i + 1]
    else:
        i = 0
        while i < len(data):
            n = rng.randrange(1, 256)
            yield data[i : i + n]
            i += n


# -- targets --------------------------------------------------------------------------------------------


def _use_frame(raw: bytes) -> None:
    """What a receiver does with frame bytes: parse, then encode a reply and the frame itself."""
    try:
        f = parse_frame(raw)
    except MgrpcError:
        return
    _use_parsed(f)


def _reply(f: Frame, **kw: Any) -> Frame:
    """The router's reply to ``f`` (id, tag, src/dst swapped)."""
    return Frame(id=f.id, src="dev", dst=f.src, tag=f.tag, **kw)


def _use_parsed(f: Frame) -> None:
    f.encode("device")
    f.encode("mos")
    f.encode("mos", html_escape=True)
    _ = f.arguments, f.is_request, f.is_response, f.wants_reply
    if f.is_request:
        _reply(f, result={"ok": True, "echo": f.arguments}).encode("device")
        _reply(f, error=ErrorInfo(500, f.method)).encode("mos")


class Target:
    """One fuzz target: ``make(rng)`` returns an input, ``run(rng, input)`` consumes it."""

    name = ""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def make(self) -> Any:
        raise NotImplementedError

    def run(self, inp: Any) -> None:
        raise NotImplementedError

    def show(self, inp: Any) -> str:
        """A reproducible rendering of an input."""
        return bytes(inp).hex() if isinstance(inp, bytes | bytearray) else repr(inp)

    def close(self) -> None:
        """Release what the target holds."""


class JsonTarget(Target):
    """Base for targets fed JSON-frame bytes (mutated seeds or generated frames)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.pool = seeds_json()
        self.mut = Mutator(rng, self.pool)

    def frame_bytes(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            return json.dumps(gen_frame(rng), separators=(",", ":")).encode()
        if r < 0.35:
            return rng.randbytes(rng.randrange(0, 200))
        base = rng.choice(self.pool) if r < 0.8 else json.dumps(gen_frame(rng)).encode()
        return self.mut.mutate(base)

    def make(self) -> Any:
        return self.frame_bytes()


class HttpTarget(JsonTarget):
    """ws message / HTTP POST body: one JSON frame."""

    name = "http"

    def run(self, inp: bytes) -> None:
        _use_frame(inp)
        try:
            f = Frame.parse(inp.decode("utf-8", "surrogateescape"))
        except (MgrpcError, UnicodeEncodeError):
            return
        _use_parsed(f)


class StreamTarget(JsonTarget):
    """Serial/TCP byte streams: several frames, junk and control bytes between them."""

    crc = True

    def make(self) -> Any:
        rng = self.rng
        enc = MosStreamEncoder(crc=self.crc and rng.random() < 0.8)
        parts = []
        for _ in range(rng.randrange(1, 4)):
            r = rng.random()
            if r < 0.6:
                body = self.frame_bytes() if rng.random() < 0.5 else rng.choice(self.pool)
                try:
                    parts.append(enc.encode(body))
                except MgrpcError:  # the encoder refuses what cannot be framed; send it raw
                    parts.append(b'"""' + body + b'"""')
            elif r < 0.7:
                parts.append(enc.handshake())
            elif r < 0.8:
                parts.append(b"\n" + rng.choice(self.pool) + b"\n")
            else:
                parts.append(rng.randbytes(rng.randrange(0, 50)))
        data = b"".join(parts)
        if rng.random() < 0.6:
            data = self.mut.mutate(data)
        return (data, rng.randrange(1 << 30))

    def show(self, inp: Any) -> str:
        return f"({inp[0].hex()!r}, split seed {inp[1]})"

    def run(self, inp: tuple[bytes, int]) -> None:
        data, seed = inp
        rng = random.Random(seed)
        # One decoder per input, in turn: the device's (ASCII-only as on a UART, or not) and the host's.
        which = seed % 3
        dec: DeviceStreamDecoder | MosStreamDecoder
        if which == 2:
            dec = MosStreamDecoder(flow_control=self.crc)
        else:
            dec = DeviceStreamDecoder(ascii_only=which == 0)
        for piece in split(rng, data):
            dec.feed(piece)
            for ev in dec.events():
                if isinstance(ev, FrameBytes):
                    _use_frame(ev.data)
        if isinstance(dec, MosStreamDecoder):
            dec.feed_eof()
            for ev in dec.events():
                if isinstance(ev, FrameBytes):
                    _use_frame(ev.data)


class SerialTarget(StreamTarget):
    name = "serial"
    crc = True


class TcpTarget(StreamTarget):
    name = "tcp"
    crc = False

    def run(self, inp: tuple[bytes, int]) -> None:
        super().run(inp)
        data, seed = inp
        rng = random.Random(seed ^ 0x5A5A)
        # The binary stream (length-prefixed msgpack) sees the same bytes, and real msgpack frames.
        if seed % 4:
            return
        codec = MsgpackCodec()
        for stream in (data, _binary_stream(rng, data)):
            dec = BinaryStreamDecoder()
            for piece in split(rng, stream):
                dec.feed(piece)
                for ev in dec.events():
                    if isinstance(ev, FrameBytes):
                        try:
                            _use_parsed(codec.decode(ev.data))
                        except MgrpcError:
                            pass
            dec.feed_eof()
            list(dec.events())


def _packb(obj: Any, *, use_bin_type: bool = True) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=use_bin_type)
    except OverflowError:  # the generator's integers beyond 64 bits: msgpack has no form for them
        data = msgpack.packb({"id": 1, "method": "RPC.Ping", "params": str(obj)[:200]})
    return data


def _binary_stream(rng: random.Random, data: bytes) -> bytes:
    out = []
    for _ in range(rng.randrange(1, 3)):
        payload = _packb(gen_frame(rng))
        if rng.random() < 0.5:
            payload = payload[: rng.randrange(len(payload) + 1)] + data[:20]
        size = len(payload) if rng.random() < 0.8 else rng.randrange(1 << 32)
        out.append(struct.pack(">I", size) + payload)
    return b"".join(out)


class MqttTarget(JsonTarget):
    """An MQTT payload on ``<id>/rpc`` or ``<id>/rpc/<Method>``, decoded as the MQTT device does."""

    name = "mqtt"

    def make(self) -> Any:
        rng = self.rng
        method = rng.choice(["", "", "Sys.GetInfo", "OTA.Write", "x/y", "\u00e9", "+", "#"])
        payload = b"" if method and rng.random() < 0.2 else self.frame_bytes()
        return (method, payload)

    def show(self, inp: Any) -> str:
        return f"({inp[0]!r}, {inp[1].hex()!r})"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        from transports.mqtt import MqttDeviceChannel, MqttMessage

        self.message = MqttMessage
        # The decoding half of the device channel needs no broker connection.
        self.channel = MqttDeviceChannel(None, "esp32_soak")  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()

    def run(self, inp: tuple[str, bytes]) -> None:
        method, payload = inp
        topic = "esp32_soak/rpc" + (f"/{method}" if method else "")
        self.loop.run_until_complete(self._decode(self.message(topic, payload)))

    async def _decode(self, msg: Any) -> None:
        frame = self.channel._decode(msg)
        if frame is not None:
            _use_parsed(frame)

    def close(self) -> None:
        self.loop.close()


class MsgpackTarget(Target):
    """One msgpack message as a frame (bytes values, ext types, huge ints, deep nesting)."""

    name = "msgpack"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.codec = MsgpackCodec()
        self.pool = [msgpack.packb(json.loads(s), use_bin_type=True) for s in seeds_json()]
        self.pool.append(msgpack.packb({"id": 1, "method": "OTA.Write", "params": {"offset": 0, "data": b"\x00" * 64}}))
        self.mut = Mutator(rng, self.pool)

    def make(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            obj: Any = gen_frame(rng)
            if rng.random() < 0.3:
                obj["params"] = {"data": rng.randbytes(30), "x": msgpack.ExtType(rng.randrange(128), b"ab")}
            return _packb(obj, use_bin_type=rng.random() < 0.8)
        if r < 0.35:
            return rng.randbytes(rng.randrange(0, 100))
        if r < 0.4:
            return b"\x91" * rng.randrange(1, 3000) + b"\xc0"  # deep nesting
        return self.mut.mutate(rng.choice(self.pool))

    def run(self, inp: bytes) -> None:
        try:
            f = self.codec.decode(inp)
        except MgrpcError:
            return
        self.codec.encode(f, "device")
        self.codec.encode(f, "mos")
        if f.is_request:
            self.codec.encode(_reply(f, result=f.arguments), "device")
        try:
            _use_parsed(f)
        except MgrpcError:
            pass  # bytes values have no JSON form; the JSON styles refuse them with the package's error


class BleTarget(JsonTarget):
    """Writes to the rpc-gatts ``tx_ctl`` and ``data`` characteristics, in any order and size."""

    name = "ble"

    def make(self) -> Any:
        rng = self.rng
        frame = self.frame_bytes()
        ops: list[tuple[str, bytes]] = []
        for _ in range(rng.randrange(1, 4)):
            r = rng.random()
            n = len(frame) if r < 0.7 else rng.choice([0, 1, len(frame) + 1, 2**32 - 1, 2**31, rng.randrange(70000)])
            ctl = encode_length(n) if rng.random() < 0.9 else rng.randbytes(rng.randrange(0, 8))
            ops.append(("ctl", ctl))
            mtu = rng.choice([20, 23, 180, 512])
            for i in range(0, len(frame), mtu):
                ops.append(("data", frame[i : i + mtu]))
            if rng.random() < 0.3:
                ops.append(("data", rng.randbytes(rng.randrange(0, 40))))
        if rng.random() < 0.3:
            rng.shuffle(ops)
        return ops

    def run(self, inp: list[tuple[str, bytes]]) -> None:
        rx = FrameReceiver()
        for kind, value in inp:
            try:
                if kind == "ctl":
                    rx.write_tx_ctl(value)
                else:
                    frame = rx.write_data(value)
                    if frame is not None:
                        _use_frame(frame)
            except MgrpcError:
                pass


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class RouterTarget(JsonTarget):
    """Frames into a virtual device's node over a loopback channel (every service, in-memory flash)."""

    name = "router"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        from rpc.auth import Acl, Authenticator
        from rpc.loopback import loop_pair
        from services import device as device_mod
        from services.device import VirtualDevice
        from updater.storage import DeviceStorage

        async def no_fetch(*args: Any, **kwargs: Any) -> tuple[int, str]:
            return -1, "downloads are off in the soak"  # fuzzed URLs must never reach the network

        device_mod.fetch_update = no_fetch
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(self._loop_error)
        self.loop_errors: list[str] = []
        self.dev = VirtualDevice(id="esp32_soak", state_dir="/nonexistent", storage=DeviceStorage.in_memory())
        self.dev.schedule_reboot = lambda *a, **k: None  # type: ignore[method-assign]
        self.loop.run_until_complete(self.dev.start())
        assert self.dev.node is not None and self.dev.storage is not None
        self.client, self.end = loop_pair("loop://soak")
        self.replies: list[bytes] = []
        self.client.deliver_bytes = self.replies.append  # type: ignore[method-assign,assignment]
        self.dev.node.add_channel(self.end)
        # A second device whose ACL wants a user for OTA.* and Sys.*: every fourth input goes there,
        # so the authenticator parses fuzzed ``auth`` members.
        acl = Acl.parse('[{"method":"OTA.*","acl":"+admin"},{"method":"Sys.*","acl":"+admin"},'
                        '{"method":"*","acl":"*"}]')
        self.secured = VirtualDevice(id="esp32_soak", state_dir="/nonexistent", storage=DeviceStorage.in_memory(),
                                     auth=Authenticator(users={"admin": "pw"}, acl=acl))  # fmt: skip
        self.secured.schedule_reboot = lambda *a, **k: None  # type: ignore[method-assign]
        self.loop.run_until_complete(self.secured.start())
        assert self.secured.node is not None
        secured_client, self.secured_end = loop_pair("loop://soak-auth")
        secured_client.deliver_bytes = self.replies.append  # type: ignore[method-assign,assignment]
        self.secured.node.add_channel(self.secured_end)
        self.count = 0
        st = self.dev.storage
        self.running_slot = st.running_slot
        part = st.layout.app[self.running_slot]
        self.running_image = st.flash.read(part.offset, part.size)
        self.handler = _CountingHandler()
        logging.getLogger().addHandler(self.handler)
        # seeds for handlers: every method with plausible params
        self.pool += [json.dumps({"id": i, "src": "mos", "method": m, "params": gen_value(rng)}).encode()
                      for i, m in enumerate(METHODS)]  # fmt: skip

    def _loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        self.loop_errors.append(str(ctx.get("message")) + ": " + repr(ctx.get("exception")))

    def run(self, inp: bytes) -> None:
        n_logged = len(self.handler.records)
        n_loop = len(self.loop_errors)
        self.count += 1
        self.loop.run_until_complete(self._feed(inp, secured=self.count % 4 == 0))
        if len(self.handler.records) > n_logged:
            rec = self.handler.records[-1]
            raise AssertionError(f"router logged an exception: {rec.getMessage()}: {rec.exc_info[1]!r}")  # type: ignore[index]
        if len(self.loop_errors) > n_loop:
            raise AssertionError(f"event loop error: {self.loop_errors[-1]}")
        del self.replies[:]

    async def _feed(self, data: bytes, *, secured: bool = False) -> None:
        (self.secured_end if secured else self.end).deliver_bytes(data)
        await _settle()

    def check_after(self) -> str | None:
        """The running slot was never written and the device still answers a ping."""
        st = self.dev.storage
        assert st is not None
        part = st.layout.app[self.running_slot]
        if st.running_slot != self.running_slot or st.flash.read(part.offset, part.size) != self.running_image:
            return "the running slot was written"
        self.replies.clear()
        self.loop.run_until_complete(self._feed(b'{"id":424242,"src":"mos","method":"RPC.Ping"}'))
        if not any(b"424242" in r and b'"result"' in r for r in self.replies):
            return f"no answer to a ping afterwards: {self.replies!r}"
        return None

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.loop.run_until_complete(self.dev.stop())
        self.loop.run_until_complete(self.secured.stop())
        asyncio.set_event_loop(None)
        self.loop.close()


async def _settle() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


TARGETS: dict[str, Callable[[random.Random], Target]] = {
    "serial": SerialTarget,
    "tcp": TcpTarget,
    "http": HttpTarget,
    "mqtt": MqttTarget,
    "ble": BleTarget,
    "msgpack": MsgpackTarget,
    "router": RouterTarget,
}


@dataclass
class FuzzResult:
    """Inputs run, failures (exceptions other than the package's, hangs) with reproducers."""

    target: str
    inputs: int = 0
    uncaught: int = 0
    hangs: int = 0
    slowest_s: float = 0.0
    after: str | None = None
    failures: list[str] = field(default_factory=list)

    def add(self, other: FuzzResult) -> None:
        """Merge another batch of the same target."""
        self.inputs += other.inputs
        self.uncaught += other.uncaught
        self.hangs += other.hangs
        self.slowest_s = max(self.slowest_s, other.slowest_s)
        self.after = self.after or other.after
        self.failures.extend(other.failures)


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def run_target(name: str, seed: int, count: int) -> FuzzResult:
    """Run ``count`` inputs of target ``name`` from ``seed``."""
    rng = random.Random(seed)
    target = TARGETS[name](rng)
    res = FuzzResult(name)
    logging.disable(logging.WARNING)  # the router logs every dropped frame; errors stay visible
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for _ in range(count):
            inp = target.make()
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, HANG_S)
            try:
                target.run(inp)
            except Hang:
                res.hangs += 1
                res.failures.append(f"{name}: hang > {HANG_S}s on {target.show(inp)}")
            except MgrpcError:
                pass
            except Exception as exc:
                res.uncaught += 1
                if len(res.failures) < 20:
                    res.failures.append(f"{name}: {type(exc).__name__}: {exc} on {target.show(inp)[:3000]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            res.slowest_s = max(res.slowest_s, time.perf_counter() - t0)
            res.inputs += 1
        after = getattr(target, "check_after", None)
        if after is not None:
            res.after = after()
    finally:
        signal.signal(signal.SIGALRM, old)
        target.close()
        logging.disable(logging.NOTSET)
    return res
