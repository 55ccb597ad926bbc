"""serial:// transport on pty pairs: exact bytes both ways, and a device node talking to our client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tty
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import pytest

import transports
from rpc.errors import RemoteError, TransportError, UsageError
from rpc.frame import Frame
from rpc.framing import HANDSHAKE, HANDSHAKE_ACK, DeviceStreamDecoder, DeviceStreamEncoder, FrameBytes, crc32_hex
from rpc.node import Node
from transports.linkemu import LinkEmulator
from transports.serial import SerialClientChannel, SerialListener

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="ptys are POSIX only"),
    pytest.mark.timeout(60),
]

DEVICE_ID = "esp32_0A1B2C"


class Pty:
    """One pty pair: the test holds the master; ``path`` is the slave for the code under test."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.rx = bytearray()
        self._event = asyncio.Event()

    def start_reading(self) -> None:
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            self.rx += os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return
        self._event.set()

    async def wait_for(self, predicate: Any, *, timeout_s: float = 5.0) -> None:
        async def loop() -> None:
            while not predicate(bytes(self.rx)):
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(loop(), timeout_s)

    def take(self, n: int | None = None) -> bytes:
        n = len(self.rx) if n is None else n
        out = bytes(self.rx[:n])
        del self.rx[:n]
        return out

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def write_all(self, data: bytes) -> None:
        """Write all of ``data``, waiting while the pty's buffer is full (a device reading slowly)."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            view = view[n:]

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.master)
        except RuntimeError:
            pass
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
async def pty() -> AsyncIterator[Pty]:
    p = Pty()
    p.start_reading()
    yield p
    p.close()


@pytest.fixture
def link() -> Iterator[LinkEmulator]:
    with LinkEmulator(baud=None) as emu:
        yield emu


def device_node() -> Node:
    node = Node(id=DEVICE_ID)
    node.add_handler("Test.Echo", lambda ctx, params: params)
    return node


# --------------------------------------------------------------------------------------------
# device side, raw bytes


async def test_device_answers_mos_exact_bytes(pty: Pty) -> None:
    node = device_node()
    lst = await transports.listen(pty.path, node)
    try:
        assert lst.url == f"serial://{pty.path}"
        pty.write(HANDSHAKE)
        await pty.wait_for(lambda rx: len(rx) >= 10)
        assert pty.take() == bytes.fromhex("0a222222042222220a0a")
        pty.write(HANDSHAKE_ACK)
        req = b'{"src":"mos","id":1580229426716,"method":"Test.Echo","params":{"s":"x"}}'
        pty.write(b'\n"""' + req + crc32_hex(req).encode() + b'"""\n')
        await pty.wait_for(lambda rx: rx.endswith(b'"""\n'))
        out = pty.take()
        reply = Frame(id=1580229426716, src=DEVICE_ID, dst="mos", result={"s": "x"}).encode("device")
        assert reply.startswith(b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"mos","result":{"s":')
        assert out.lstrip(b"\n") == b'"""' + reply + crc32_hex(reply).encode() + b'"""\n'
        assert set(out[: len(out) - len(out.lstrip(b"\n"))]) == {0x0A}
    finally:
        await lst.close()
        await node.close()


async def test_device_line_style_and_rpc_ping(pty: Pty) -> None:
    node = device_node()
    lst = await transports.listen(f"serial://{pty.path}?uart_no=1", node)
    try:
        body = b'{"src":"tool","id":5,"method":"RPC.Ping"}'
        pty.write(body + crc32_hex(body).encode() + b"\n")  # mgrpc_uart.py style
        await pty.wait_for(lambda rx: rx.endswith(b"\n") and b"}" in rx)
        reply = Frame(id=5, src=DEVICE_ID, dst="tool", result={"channel_info": "UART1"}).encode("device")
        assert pty.take() == b"\n" + reply + crc32_hex(reply).encode() + b"\n"
        # Corrupted frame: dropped without a reply; then non-ASCII: buffer dropped; then fine again.
        pty.write(body + b"00000000\n")
        pty.write('{"src":"tool","id":6,"method":"Test.Echo","params":"é"}\n'.encode())
        body7 = b'{"src":"tool","id":7,"method":"Test.Echo","params":7}'
        pty.write(body7 + b"\n")
        await pty.wait_for(lambda rx: b'"id":7' in rx and rx.endswith(b"\n"))
        out = pty.take()
        assert b'"id":5' not in out and b'"id":6' not in out
        assert b'{"id":7,"src":"esp32_0A1B2C","dst":"tool","result":7}' in out
        ch = lst.channel if isinstance(lst, SerialListener) else None
        assert ch is not None and ch.type == "UART" and ch.persistent and ch.broadcast
    finally:
        await lst.close()
        await node.close()


# --------------------------------------------------------------------------------------------
# client side, raw bytes (the test plays the device)


class FakeDevice:
    """The rpc-uart algorithm on the master end of a pty, answering frames via ``answer``."""

    def __init__(self, pty: Pty, answer: Any) -> None:
        self.pty = pty
        self.dec = DeviceStreamDecoder()
        self.enc = DeviceStreamEncoder(modes=self.dec.modes)
        self.answer = answer
        self.frames: list[bytes] = []
        self.raw = bytearray()
        self.handshakes = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self.pty.wait_for(lambda rx: len(rx) > 0, timeout_s=60)
            data = self.pty.take()
            self.raw += data
            self.dec.feed(data)
            for ev in self.dec.events():
                self.enc.handle(ev)
                if type(ev).__name__ == "Handshake":
                    self.handshakes += 1
                if isinstance(ev, FrameBytes):
                    self.frames.append(ev.data)
                    reply = self.answer(json.loads(ev.data))
                    if reply is not None:
                        self.pty.write(reply)
            out = self.enc.data_to_send()
            if out:
                self.pty.write(out)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def reply_frame(req: dict[str, Any], result: Any, *, junk: bytes = b"") -> bytes:
    body = json.dumps({"id": req["id"], "src": DEVICE_ID, "dst": req["src"], "result": result}, separators=(",", ":"))
    return junk + b'\n"""' + body.encode() + crc32_hex(body.encode()).encode() + b'"""\n'


async def test_client_writes_mos_bytes_and_collects_junk(pty: Pty) -> None:
    junk: list[bytes] = []
    dev = FakeDevice(pty, lambda req: reply_frame(req, {"echo": req.get("params")}, junk=b"I (123) log line\r\n"))
    client = await transports.connect(pty.path, timeout_s=5, on_junk=junk.append)
    try:
        assert await client.call("Test.Echo", {"s": "é"}) == {"echo": {"s": "é"}}
        assert await client.call("Test.Echo", 2) == {"echo": 2}
        raw = bytes(dev.raw)
        # Handshake first, then the ack, then the frames exactly as mos writes them (CRC, """).
        assert raw.startswith(HANDSHAKE)
        assert dev.handshakes == 1  # once per connection by default
        (first, second) = dev.frames
        assert b"\\u00e9" in first  # non-ASCII is escaped for the UART
        assert raw.endswith(b'\n"""' + second + crc32_hex(second).encode() + b'"""\n')
        assert HANDSHAKE + HANDSHAKE_ACK + b'\n"""' + first in raw
        assert b"I (123) log line\r\n" in b"".join(junk)
        ch = client.channel
        assert isinstance(ch, SerialClientChannel) and ch.handshake_complete
    finally:
        await client.close()
        await dev.stop()


async def test_client_handshake_every_frame_with_pacing(pty: Pty) -> None:
    dev = FakeDevice(pty, lambda req: reply_frame(req, req["id"]))
    client = await transports.connect(f"serial://{pty.path}?handshake=every&pacing=1", timeout_s=5)
    try:
        for _ in range(3):
            await client.call("Test.Echo")
        assert dev.handshakes == 3
        assert bytes(dev.raw).count(HANDSHAKE_ACK + b'\n"""{') == 3
    finally:
        await client.close()
        await dev.stop()


async def test_client_handshake_wait_interval_waits_the_whole_interval_as_mos(pty: Pty) -> None:
    """mos sleeps the whole handshake interval before it looks for the answer: so does ?handshake_wait=interval."""
    dev = FakeDevice(pty, lambda req: reply_frame(req, req["id"]))
    url = f"serial://{pty.path}?handshake=every&handshake_wait=interval"
    client = await transports.connect(url, timeout_s=5, handshake_interval_s=0.3)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await client.call("Test.Echo")
        await client.call("Test.Echo")
        assert loop.time() - t0 >= 0.6  # two frames, each after a whole interval (a lower bound only)
        assert dev.handshakes == 2
    finally:
        await client.close()
        await dev.stop()
    with pytest.raises(UsageError, match="handshake_wait must be one of reply, interval"):
        await transports.connect(f"serial://{pty.path}?handshake_wait=soon", timeout_s=5)


async def test_client_handshake_off_and_handshake_timeout(pty: Pty) -> None:
    dev = FakeDevice(pty, lambda req: reply_frame(req, "ok"))
    client = await transports.connect(f"serial://{pty.path}?handshake=off", timeout_s=5)
    try:
        assert await client.call("X.Y") == "ok"
        assert dev.handshakes == 0 and bytes(dev.raw).startswith(b'\n"""{')
    finally:
        await client.close()
        await dev.stop()
    # Nobody answers: the handshake gives up with a clear message.
    client = await transports.connect(pty.path, timeout_s=5, handshake_timeout_s=0.5, handshake_interval_s=0.1)
    try:
        with pytest.raises(TransportError, match="No response to handshake"):
            await client.call("X.Y")
        assert pty.take().startswith(HANDSHAKE * 2)
    finally:
        await client.close()


async def test_client_honours_xoff_xon(pty: Pty) -> None:
    dev = FakeDevice(pty, lambda req: reply_frame(req, "ok"))
    client = await transports.connect(pty.path, timeout_s=5)
    try:
        assert await client.call("A.B") == "ok"
        await dev.stop()
        pty.write(b"\x13")  # XOFF
        await asyncio.sleep(0.1)
        task = asyncio.ensure_future(client.call("C.D"))
        try:
            await asyncio.sleep(0.3)
            assert not pty.rx  # nothing written while XOFF is in effect
            dev = FakeDevice(pty, lambda req: reply_frame(req, "resumed"))
            pty.write(b"\x11")  # XON
            assert await asyncio.wait_for(task, 5) == "resumed"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await client.close()
        await dev.stop()


async def test_client_bad_crc_closes_connection(pty: Pty) -> None:
    def bad(req: dict[str, Any]) -> bytes:
        return b'\n"""{"id":%d,"result":1}00000000"""\n' % req["id"]

    dev = FakeDevice(pty, bad)
    client = await transports.connect(pty.path, timeout_s=5)
    try:
        with pytest.raises(TransportError):  # ChannelClosed is a TransportError
            await client.call("A.B")
        assert client.channel.closed
    finally:
        await client.close()
        await dev.stop()


# --------------------------------------------------------------------------------------------
# device node <-> client over a link


@pytest.mark.parametrize("io", ["fd", "thread"])
async def test_node_to_client_over_link(link: LinkEmulator, io: str) -> None:
    node = device_node()
    lst = await transports.listen(link.a_path, node, io=io)
    client = await transports.connect(link.b_path, timeout_s=10, io=io)
    try:
        assert await client.call("Test.Echo", {"u": "ü€😀", "n": [1, 2]}) == {"u": "ü€😀", "n": [1, 2]}
        big = "x" * 3000
        assert await client.call("Test.Echo", big) == big
        assert await client.call("RPC.Ping") == {"channel_info": "UART0"}
        # Requests are escaped for the UART; the device answers UTF-8 as a real one does.
        resp = await client.call_frame("Test.Echo", "é")
        assert resp.raw is not None and "é".encode() in resp.raw
        with pytest.raises(RemoteError) as ei:
            await client.call("No.Such")
        assert ei.value.code == 404
        results = await asyncio.gather(*(client.call("Test.Echo", i) for i in range(10)))
        assert results == list(range(10))
    finally:
        await client.close()
        await lst.close()
        await node.close()


async def test_node_to_client_at_115200_with_mos_defaults() -> None:
    with LinkEmulator(baud=115200) as emu:
        node = device_node()
        lst = await transports.listen(emu.a_path, node)
        client = await transports.connect(f"serial://{emu.b_path}?pacing=1&handshake=every", timeout_s=10)
        try:
            assert await client.call("Test.Echo", {"k": "v" * 200}) == {"k": "v" * 200}
            assert await client.call("Test.Echo", 1) == 1
            ch = client.channel
            assert isinstance(ch, SerialClientChannel) and ch.handshakes_sent >= 2
        finally:
            await client.close()
            await lst.close()
            await node.close()


# --------------------------------------------------------------------------------------------
# errors


async def test_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    with pytest.raises(UsageError, match="valid options"):
        await transports.open_client("serial:///dev/null?speed=1")
    with pytest.raises(UsageError, match="baud"):
        await transports.open_client("serial:///dev/null?baud=fast")
    with pytest.raises(UsageError, match="no device path"):
        await transports.open_client("serial://")
    with pytest.raises(UsageError, match="handshake"):
        await transports.open_client("serial:///dev/null?handshake=sometimes")
    with pytest.raises(TransportError, match="cannot open serial port"):
        await transports.open_client(str(tmp_path / "no-such-tty"))
    monkeypatch.setitem(sys.modules, "serial", None)
    with pytest.raises(TransportError, match=r"mgrpc\[serial\]"):
        await transports.open_client("/dev/ttyUSB9")


# --------------------------------------------------------------------------------------------
# mgrpc console


def test_console_formatter_timestamps() -> None:
    from mgrpc.cli.console import ConsoleFormatter, timestamp_formatter

    t = datetime(2020, 1, 5, 13, 4, 5, 123456).timestamp()
    stamp = timestamp_formatter(None)
    assert stamp is not None and stamp(t) == "[Jan  5 13:04:05.123] "
    fmt = ConsoleFormatter(stamp)
    assert fmt.feed(b"boot\r\nline tw", t) == "[Jan  5 13:04:05.123] boot\r\n[Jan  5 13:04:05.123] line tw"
    assert fmt.feed(b"o\n", t + 1) == "o\n"  # the line had started: no new prefix
    assert fmt.feed("é".encode()[:1], t) == ""  # half a UTF-8 character waits for the rest
    assert fmt.feed("é\n".encode()[1:], t) == "[Jan  5 13:04:05.123] é\n"
    epoch = timestamp_formatter("true")
    assert epoch is not None and epoch(1580229426.716123) == "[1580229426.716123] "
    assert ConsoleFormatter(timestamp_formatter("off")).feed(b"a\nb", t) == "a\nb"
    strf = timestamp_formatter("%H:%M")
    assert strf is not None and strf(t) == "[13:04] "
    with pytest.raises(UsageError):
        timestamp_formatter("Sometimes")


async def test_console_prints_device_output(pty: Pty) -> None:
    import argparse
    import io

    from mgrpc.cli import console

    parser = argparse.ArgumentParser()
    console.register(parser.add_subparsers())
    args = parser.parse_args(["console", "--no-input", "--timestamp", "false", "--duration", "2s"])
    ser = console._open(pty.path, args)
    try:
        pty.write(b'I (12) boot: ok\r\n\n"""{"id":1,"result":1}"""\n')
        out = io.StringIO()
        await asyncio.to_thread(
            console._run, ser, console.ConsoleFormatter(None), out, duration_s=0.5, forward_stdin=False
        )
    finally:
        ser.close()
    assert out.getvalue() == 'I (12) boot: ok\r\n\n"""{"id":1,"result":1}"""\n'
    assert args.func is console.cmd_console


async def test_device_console_output_is_junk_between_frames(link: LinkEmulator) -> None:
    node = device_node()
    junk: list[bytes] = []

    def echo_and_log(ctx: Any, params: Any) -> Any:
        ctx.channel.write_console("I (42) handler ran\r\n")
        return params

    node.add_handler("Test.Log", echo_and_log)
    lst = await transports.listen(link.a_path, node)
    client = await transports.connect(link.b_path, timeout_s=10, on_junk=junk.append)
    try:
        assert await client.call("Test.Log", [1]) == [1]
        assert await client.call("Test.Log", [2]) == [2]
        assert b"".join(junk).count(b"I (42) handler ran\r\n") == 2
    finally:
        await client.close()
        await lst.close()
        await node.close()
