"""``mgrpc call``: output exactly like ``mos call`` (spec/tool.md §3), env vars, creds, errors."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest

import transports
from mgrpc.cli import main
from rpc.auth import Acl, Authenticator
from rpc.errors import HandlerError
from rpc.frame import RawJSON
from rpc.jsonfmt import member_text
from rpc.node import Node


class DeviceThread:
    """A device node served on tcp://127.0.0.1 from its own event loop thread."""

    def __init__(self, node: Node, listen: str = "tcp://127.0.0.1:0") -> None:
        self.node = node
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listener = asyncio.run_coroutine_threadsafe(
            transports.listen(listen, node), self.loop
        ).result()
        self.url = self.listener.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result()
        asyncio.run_coroutine_threadsafe(self.node.close(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def device() -> Iterator[DeviceThread]:
    node = Node(id="esp32_0A1B2C")
    node.add_handler(
        "OTA.GetBootState",
        lambda ctx, p: RawJSON('{"active_slot": 0, "is_committed": true, "revert_slot": 1, "commit_timeout": 0}'),
    )
    node.add_handler("Echo", lambda ctx, p: p)
    node.add_handler(
        "Raw",
        lambda ctx, p: RawJSON('{"n": 1.50, "big": 12345678901234567890, "s": "<a&b>", "u": "é", "e": [], "o": {}}'),
    )
    node.add_handler("Nothing", lambda ctx, p: None)
    # the params text exactly as it arrived on the wire
    node.add_handler("Params", lambda ctx, p: RawJSON(member_text(ctx.frame.raw.decode(), "params") or "null"))

    def fail(ctx, p):
        raise HandlerError(-1)

    def zero(ctx, p):
        raise HandlerError(0, "done")

    node.add_handler("Fail", fail)
    node.add_handler("Zero", zero)
    d = DeviceThread(node)
    yield d
    d.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_result_printed_like_mos(device: DeviceThread, capsys) -> None:
    rc, out, _ = run(capsys, "--port", device.url, "call", "OTA.GetBootState")
    assert rc == 0
    assert out == '{\n  "active_slot": 0,\n  "is_committed": true,\n  "revert_slot": 1,\n  "commit_timeout": 0\n}\n'


def test_numbers_verbatim_html_escaped_non_ascii_raw(device: DeviceThread, capsys) -> None:
    rc, out, _ = run(capsys, "call", "Raw", "--port", device.url)  # flags after the command too
    assert rc == 0
    assert out == (
        '{\n  "n": 1.50,\n  "big": 12345678901234567890,\n  "s": "\\u003ca\\u0026b\\u003e",\n'
        '  "u": "é",\n  "e": [],\n  "o": {}\n}\n'
    )


def test_null_for_no_result_and_code_zero(device: DeviceThread, capsys) -> None:
    assert run(capsys, "--port", device.url, "call", "Nothing") == (0, "null\n", "")
    assert run(capsys, "--port", device.url, "call", "Zero") == (0, "null\n", "")


def test_params_compacted_and_echoed(device: DeviceThread, capsys) -> None:
    rc, out, _ = run(capsys, "--port", device.url, "call", "Echo", '{"key": "device.id",  "n": [1, 2]}')
    assert rc == 0 and out == '{\n  "key": "device.id",\n  "n": [\n    1,\n    2\n  ]\n}\n'


def test_params_text_sent_verbatim_only_compacted(device: DeviceThread, capsys) -> None:
    # mos passes the argument through json.RawMessage: whitespace goes, numbers and escapes stay
    rc, out, _ = run(capsys, "--port", device.url, "call", "Params", '{"n": 1.50, "e": 1e3, "u": "\\u00e9 x"}')
    assert rc == 0 and out == '{\n  "n": 1.50,\n  "e": 1e3,\n  "u": "\\u00e9 x"\n}\n'


def test_remote_error(device: DeviceThread, capsys) -> None:
    rc, out, err = run(capsys, "--port", device.url, "call", "Foo.Bar")
    assert rc == 1 and out == "" and "remote error 404: No handler for Foo.Bar" in err
    rc, out, err = run(capsys, "--port", device.url, "call", "Fail")
    assert rc == 1 and "remote error -1: " in err


def test_invalid_json_args_refused(device: DeviceThread, capsys) -> None:
    rc, out, err = run(capsys, "--port", device.url, "call", "Echo", "{nope")
    assert rc == 2 and out == "" and "Args [{nope] is not a valid JSON string" in err


def test_port_from_environment(device: DeviceThread, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MOS_PORT", device.url)
    assert run(capsys, "call", "Nothing")[:2] == (0, "null\n")
    monkeypatch.delenv("MOS_PORT")
    monkeypatch.setenv("MGRPC_PORT", device.url)
    assert run(capsys, "call", "Nothing")[:2] == (0, "null\n")


def test_timeout_and_unreachable(device: DeviceThread, capsys) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rc, out, err = run(capsys, "--port", f"tcp://127.0.0.1:{port}", "call", "Nothing")
    assert rc == 1 and out == "" and "connection refused" in err

    def never(ctx, p):
        return asyncio.get_running_loop().create_future()  # never answered

    device.node.add_handler("Never", never)
    rc, out, err = run(capsys, "--port", device.url, "--timeout", "300ms", "call", "Never")
    assert rc == 1 and "context deadline exceeded" in err and "raise --timeout" in err


def test_rpc_creds(capsys, tmp_path) -> None:
    node = Node(id="dev", auth=Authenticator(users={"admin": "pw"}, acl=Acl.parse('[{"method":"*","acl":"+admin"}]')))
    node.add_handler("Who", lambda ctx, p: ctx.user)
    d = DeviceThread(node)
    try:
        rc, _out, err = run(capsys, "--port", d.url, "call", "Who")
        assert rc == 1 and "pass --rpc-creds user:pass" in err
        assert run(capsys, "--port", d.url, "--rpc-creds", "admin:pw", "call", "Who")[:2] == (0, '"admin"\n')
        f = tmp_path / "creds"
        f.write_text("admin:pw\n")
        assert run(capsys, "--port", d.url, "--rpc-creds", f"@{f}", "call", "Who")[:2] == (0, '"admin"\n')
    finally:
        d.stop()


@pytest.mark.parametrize("scheme", ["wss", "https"])
def test_mos_tls_flags_verify_the_device(capsys, tmp_path, scheme: str) -> None:
    from tests.transports.test_ws import _self_signed

    cert, key = _self_signed(tmp_path)
    node = Node(id="dev")
    node.add_handler("Echo", lambda ctx, p: p)
    d = DeviceThread(node, f"{scheme}://127.0.0.1:0/rpc?cert={cert}&key={key}")
    url = d.url.split("?", 1)[0]
    try:
        rc, _out, err = run(capsys, "--port", url, "call", "Echo", "1")
        assert rc == 1 and "certificate is not trusted" in err and "--ca-cert-file" in err and "?insecure=1" in err
        assert len(err.strip().splitlines()) == 1
        assert run(capsys, "--port", url, "--ca-cert-file", str(cert), "call", "Echo", "2")[:2] == (0, "2\n")
        assert run(capsys, "--port", f"{url}?insecure=1", "call", "Echo", "3")[:2] == (0, "3\n")
    finally:
        d.stop()


def test_help_documents_every_command(capsys) -> None:
    from mgrpc.cli import COMMANDS, build_parser

    parser = build_parser()
    text = parser.format_help()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():  # type: ignore[attr-defined]
        assert name in text
        assert p.description or p.format_help()
    assert len(COMMANDS) >= 8


def test_frames_logged_at_debug(caplog, device: DeviceThread, capsys) -> None:
    async def go() -> None:
        node = Node(id="d")
        node.add_handler("X", lambda ctx, p: 1)
        lst = await transports.listen("loop://log-test", node)
        async with await transports.connect("loop://log-test") as c:
            await c.call("X")
        await lst.close()

    import structlog

    structlog.reset_defaults()  # the CLI tests above configured a WARNING filter
    structlog.configure(
        logger_factory=structlog.stdlib.LoggerFactory(),
        processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
    )
    with caplog.at_level(logging.DEBUG, logger="mgrpc.frame"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "mgrpc.frame"]
    assert any("event='rx'" in m and "channel='loopback'" in m and "method='X'" in m for m in lines), lines
    assert any("event='tx'" in m for m in lines)
    structlog.reset_defaults()
