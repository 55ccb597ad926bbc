"""Small fakes shared by the core tests."""

from __future__ import annotations

import asyncio

from rpc.channel import Channel
from rpc.frame import Frame, parse_frame


class RecordingChannel(Channel):
    """A channel whose peer is the test: frames sent are recorded as exact bytes; frames are injected."""

    def __init__(self, type_: str = "UART", *, persistent: bool = True, style: str = "device") -> None:
        super().__init__(style=style)  # type: ignore[arg-type]
        self.type = type_
        self.persistent = persistent
        self.sent: list[bytes] = []
        self.got = asyncio.Event()

    def info(self) -> str:
        return "UART0" if self.type == "UART" else "test"

    async def send(self, frame: Frame) -> None:
        self.sent.append(self.encode(frame))
        self.got.set()

    async def close(self) -> None:
        self.mark_closed()

    def inject(self, wire: bytes) -> None:
        self.deliver(parse_frame(wire))

    async def next_sent(self, timeout_s: float = 2.0) -> bytes:
        while not self.sent:
            self.got.clear()
            await asyncio.wait_for(self.got.wait(), timeout_s)
        return self.sent.pop(0)

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
