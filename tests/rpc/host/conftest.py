"""The ``fake`` fixture: a :class:`FakeOta` served over loop://, with ``dev.connect()`` for clients."""

from __future__ import annotations

import pytest

import transports
from rpc.client import AsyncClient
from tests.rpc.host.fakeota import FakeOta, names


@pytest.fixture
async def fake():
    dev = FakeOta()
    url = f"loop://fakeota{next(names)}"
    lst = await transports.listen(url, dev.node)
    dev.url = url  # type: ignore[attr-defined]

    async def connect() -> AsyncClient:
        c = await transports.connect(url, timeout_s=5.0)
        dev.client = c
        return c

    dev.connect = connect  # type: ignore[attr-defined]
    yield dev
    await lst.close()
    await dev.node.close()
