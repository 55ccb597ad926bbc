"""An independent fault-injection device for the conformance suite's own tests.

Written from the protocol reference (docs/protocol/) with the Python standard library only: its own
frame writer and parser, stream framing, HTTP/WebSocket server, pty serial port and MQTT client. It
imports nothing from the project's packages (``rpc``, ``transports``, ``services``, ``updater``,
``conformance``, ``mgrpc``; tests/faultdev/test_independent.py checks), so a mistake shared with our
own router cannot hide a fault. With ``fault=None`` it is a correct device; with one name from
:data:`FAULTS` it breaks exactly one rule, and :attr:`Fault.check` names the check that must fail.

Usage (in a test, inside a running event loop)::

    dev = await FaultDevice("tag_dropped").start("ws")
    url = dev.url            # ws://127.0.0.1:PORT/rpc
    ...
    await dev.close()

or from a shell: ``python -m tests.faultdev --fault tag_dropped --transport ws``.
"""

from __future__ import annotations

from typing import Any

from tests.faultdev.device import Device
from tests.faultdev.faults import AUTH_DENIED_METHOD, AUTH_USER, FAULTS, Fault

__all__ = ["AUTH_DENIED_METHOD", "AUTH_USER", "FAULTS", "TRANSPORTS", "Fault", "FaultDevice"]

TRANSPORTS = ("ws", "http", "tcp", "serial", "mqtt")


class FaultDevice:
    """One device (optionally with one fault) served on one transport.

    ``auth``: demand digest auth with the ACL of :data:`faults.AUTH_ACL` (default: on for the faults
    marked ``auth``, off otherwise).
    """

    def __init__(self, fault: str | None = None, *, device_id: str = "faultdev", auth: bool | None = None) -> None:
        self.device = Device(fault, device_id=device_id, auth=auth)
        self.url = ""
        self._parts: list[Any] = []

    async def start(self, transport: str, *, broker: tuple[str, int] | None = None) -> FaultDevice:
        """Serve on ``transport`` (one of :data:`TRANSPORTS`); MQTT needs ``broker`` (host, port)."""
        from tests.faultdev import servers

        if transport in ("ws", "http"):
            srv = await servers.HttpServer(self.device).start()
            self._parts.append(srv)
            self.url = f"{transport}://127.0.0.1:{srv.port}/rpc"
        elif transport == "tcp":
            tcp = await servers.TcpServer(self.device).start()
            self._parts.append(tcp)
            self.url = f"tcp://127.0.0.1:{tcp.port}"
        elif transport == "serial":
            pty = await servers.PtySerial(self.device).start()
            self._parts.append(pty)
            self.url = f"serial://{pty.path}"
        elif transport == "mqtt":
            if broker is None:
                raise ValueError("mqtt needs a broker (host, port)")
            link = await servers.MqttLink(self.device, *broker).start()
            self._parts.append(link)
            self.url = f"mqtt://{broker[0]}:{broker[1]}/{self.device.id}"
        else:
            raise ValueError(f"unknown transport {transport!r}; known: {', '.join(TRANSPORTS)}")
        return self

    async def close(self) -> None:
        """Stop serving."""
        self.device.close()
        for part in reversed(self._parts):
            await part.close()
        self._parts.clear()
