"""mqtt:// against a real mosquitto on 127.0.0.1 (spec/transports.md §4, frame.md §7 example 10).

The device is ``rpc.node.Node(id=...)`` served with ``transports.listen``; the client is
``transports.connect("mqtt://127.0.0.1:PORT/<id>")``. A raw paho client subscribed to ``#`` (the
"sniffer") sees exactly what goes over the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from rpc.errors import HandlerError, RemoteError, RpcTimeout, TransportError, UsageError
from rpc.frame import Frame, RawJSON
from rpc.node import Node
from tests.mosquitto import Mosquitto, free_port, make_tls_files, mosquitto_broker  # noqa: F401
from tests.netfaults import Gate, descriptors_above_1023
from transports import connect, listen, parse_url, registry

mqtt = pytest.importorskip("paho.mqtt.client")

from transports import mqtt as tmqtt  # noqa: E402 - after the importorskip on purpose
from transports import mqttconn  # noqa: E402

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0  # upper bound of every wait; tests never depend on how fast things are


# ---------------------------------------------------------------------------------------------
# helpers


class Sniffer:
    """A raw paho client: records every message on ``#`` and can publish raw payloads."""

    def __init__(self, broker: Mosquitto, topic: str = "#") -> None:
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sniffer-{id(self)}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "sniffer got no SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def snapshot(self) -> list[tuple[str, bytes, int, bool]]:
        with self._lock:
            return list(self.messages)

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _, _ in self.snapshot() if t == topic]

    async def wait_for(self, pred: Callable[[list[tuple[str, bytes, int, bool]]], bool]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not pred(self.snapshot()):
            assert loop.time() < deadline, f"sniffer timed out; saw {self.snapshot()!r}"
            await asyncio.sleep(0.01)

    async def wait_topic(self, topic: str, count: int = 1) -> list[bytes]:
        await self.wait_for(lambda msgs: sum(1 for t, *_ in msgs if t == topic) >= count)
        return self.on(topic)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(mosquitto_broker: Callable[..., Mosquitto]) -> Mosquitto:  # noqa: F811 - the imported fixture
    return mosquitto_broker()


@pytest.fixture
def sniffer(broker: Mosquitto) -> Any:
    s = Sniffer(broker)
    yield s
    s.close()


class Recorder:
    """Handlers of the test device; counts calls per method."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.event = asyncio.Event()

    def add(self, ctx: Any, params: Any) -> Any:
        self.calls.append((ctx.method, params))
        self.event.set()
        return params


def make_device(device_id: str = "dev1", **kw: Any) -> tuple[Node, Recorder]:
    node = Node(id=device_id, **kw)
    rec = Recorder()
    node.add_handler("Test.Echo", rec.add)
    node.add_handler("Test.Note", rec.add)
    node.add_handler("Test.Id", lambda ctx, p: ctx.node.id)

    def fail(ctx: Any, params: Any) -> Any:
        raise HandlerError(-1, "boom")

    node.add_handler("Test.Fail", fail)
    return node, rec


@pytest.fixture
async def device(broker: Mosquitto) -> AsyncIterator[tuple[Node, Recorder, Any]]:
    node, rec = make_device("dev1")
    lst = await listen(f"mqtt://127.0.0.1:{broker.port}", node)
    yield node, rec, lst
    await lst.close()
    await node.close()


@pytest.fixture
async def client(broker: Mosquitto, device: Any) -> AsyncIterator[Any]:
    c = await connect(broker.url("dev1"), timeout_s=WAIT_S)
    yield c
    await c.close()


# ---------------------------------------------------------------------------------------------
# calls


async def test_call_returns_result(client: Any) -> None:
    assert await client.call("Test.Echo", {"a": 1, "b": [1, 2]}) == {"a": 1, "b": [1, 2]}
    assert await client.call("Test.Id") == "dev1"


async def test_error_replies(client: Any) -> None:
    with pytest.raises(RemoteError) as ei:
        await client.call("Test.Fail")
    assert (ei.value.code, ei.value.message) == (-1, "boom")
    with pytest.raises(RemoteError) as ei:
        await client.call("Foo.Bar")
    assert (ei.value.code, ei.value.message) == (404, "No handler for Foo.Bar")


async def test_channel_facts_and_ping(client: Any, device: Any) -> None:
    node, _, lst = device
    ch = lst.channel
    assert (ch.type, ch.persistent, ch.broadcast, ch.info()) == ("MQTT", True, False, "")
    assert node.route("anything") is ch  # the default route '*'
    assert await client.call("RPC.Ping") == {"channel_info": ""}
    assert client.channel.type == "MQTT"


async def test_notification_gets_no_reply(client: Any, device: Any, sniffer: Sniffer) -> None:
    _, rec, _ = device
    client.notify("Test.Note", {"n": 1})
    await asyncio.wait_for(rec.event.wait(), WAIT_S)
    assert rec.calls == [("Test.Note", {"n": 1})]
    # A later call's reply is the only thing that ever comes back on the reply topic.
    assert await client.call("Test.Echo", 2) == 2
    resp_topic = f"dev1/rpc-resp/{client.channel.client_id}/rpc"
    replies = await sniffer.wait_topic(resp_topic)
    assert [json.loads(r)["result"] for r in replies] == [2]
    requests = [json.loads(p) for p in await sniffer.wait_topic("dev1/rpc", 2)]
    assert "id" not in requests[0] and requests[0]["method"] == "Test.Note"


async def test_concurrent_calls(client: Any) -> None:
    results = await asyncio.gather(*(client.call("Test.Echo", {"i": i}) for i in range(50)))
    assert results == [{"i": i} for i in range(50)]


async def test_large_frame(broker: Mosquitto) -> None:
    node, _ = make_device("big", max_frame_size=1 << 20)
    lst = await listen(broker.url("big"), node)
    c = await connect(broker.url("big"), timeout_s=WAIT_S)
    try:
        # The client node caps frames at 4096 bytes by default (Node.add_channel); raise it too.
        c.node.max_frame_size = 1 << 20
        c.channel.codec.max_frame_size = 1 << 20  # type: ignore[attr-defined]
        blob = "x" * 200_000
        assert await c.call("Test.Echo", {"blob": blob}) == {"blob": blob}
    finally:
        await c.close()
        await lst.close()
        await node.close()


async def test_oversize_frame_dropped_device_keeps_serving(client: Any, device: Any) -> None:
    _, rec, _ = device
    with pytest.raises(RpcTimeout):
        await client.call("Test.Echo", "y" * 5000, timeout_s=0.5)  # over the device's 4096 limit
    assert rec.calls == []
    assert await client.call("Test.Echo", "ok") == "ok"


# ---------------------------------------------------------------------------------------------
# device side rules


async def test_device_drops_request_without_src(
    device: Any, sniffer: Sniffer, caplog: pytest.LogCaptureFixture
) -> None:
    _, rec, _ = device
    with caplog.at_level(logging.WARNING, logger="mgrpc.mqtt"):
        sniffer.publish("dev1/rpc", b'{"id":5,"method":"Test.Echo","params":"nosrc"}')
        sniffer.publish("dev1/rpc", b'{"id":6,"src":"tester","method":"Test.Echo","params":"withsrc"}')
        replies = await sniffer.wait_topic("tester/rpc")
    # The device handles frames in order, so an answer to id 5 would have come before id 6's.
    assert [json.loads(r)["id"] for r in replies] == [6]
    assert rec.calls == [("Test.Echo", "withsrc")]
    assert "Drop frame without src" in caplog.text
    # Without an id it is a notification and is run (nothing to reply to anyway).
    rec.event.clear()
    sniffer.publish("dev1/rpc", b'{"method":"Test.Note","params":"n"}')
    await asyncio.wait_for(rec.event.wait(), WAIT_S)
    assert rec.calls[-1] == ("Test.Note", "n")


async def test_topic_suffix_sets_method(device: Any, sniffer: Sniffer) -> None:
    _, rec, _ = device
    sniffer.publish("dev1/rpc/Test.Echo", b'{"id":7,"src":"tester","params":{"a":1}}')
    sniffer.publish("dev1/rpc/Test.Id", b'{"id":8,"src":"tester","method":"Test.Fail"}')  # topic wins
    replies = [json.loads(r) for r in await sniffer.wait_topic("tester/rpc", 2)]
    assert replies == [
        {"id": 7, "src": "dev1", "dst": "tester", "result": {"a": 1}},
        {"id": 8, "src": "dev1", "dst": "tester", "result": "dev1"},
    ]
    assert rec.calls == [("Test.Echo", {"a": 1})]


async def test_bad_payload_is_dropped(device: Any, sniffer: Sniffer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mgrpc.mqtt"):
        sniffer.publish("dev1/rpc", b"{not json")
        sniffer.publish("dev1/rpc", b'{"id":9,"src":"tester","method":"Test.Echo","params":1}')
        replies = await sniffer.wait_topic("tester/rpc")
    assert [json.loads(r)["id"] for r in replies] == [9]
    assert "dropping bad frame" in caplog.text


async def test_duplicate_delivery_is_answered_once(device: Any, sniffer: Sniffer) -> None:
    _, rec, _ = device
    req = b'{"id":10,"src":"tester","method":"Test.Echo","params":"once"}'
    sniffer.publish("dev1/rpc", req)
    sniffer.publish("dev1/rpc", req)  # as a broker delivering on both subscriptions would
    # Same id but a different payload (like mos's digest-auth retry) is a new request.
    sniffer.publish("dev1/rpc", b'{"id":10,"src":"tester","method":"Test.Echo","params":"again"}')
    sniffer.publish("dev1/rpc", b'{"id":11,"src":"tester","method":"Test.Echo","params":"last"}')
    replies = [json.loads(r) for r in await sniffer.wait_topic("tester/rpc", 3)]
    assert [(r["id"], r["result"]) for r in replies] == [(10, "once"), (10, "again"), (11, "last")]
    assert [p for _, p in rec.calls] == ["once", "again", "last"]


async def test_device_cannot_reply_without_dst(device: Any, caplog: pytest.LogCaptureFixture) -> None:
    _, _, lst = device
    with caplog.at_level(logging.WARNING, logger="mgrpc.mqtt"), pytest.raises(TransportError):
        await lst.channel.send(Frame(id=1, src="dev1", result=1))
    assert "Cannot reply to RPC over MQTT, no dst" in caplog.text


async def test_device_reply_topic_and_style(device: Any, sniffer: Sniffer) -> None:
    sniffer.publish("dev1/rpc", b'{"id":"abc","src":"some/where","tag":"t1","method":"Test.Echo","params":"<&>"}')
    (reply,) = await sniffer.wait_topic("some/where/rpc")
    # Device style: fixed member order, tag copied, no HTML escaping (frozen's %Q).
    assert reply == b'{"id":"abc","src":"dev1","dst":"some/where","tag":"t1","result":"<&>"}'
    topics = {t: q for t, _, q, _ in sniffer.snapshot()}
    assert topics["some/where/rpc"] == 1


# ---------------------------------------------------------------------------------------------
# client side: exact bytes and topics


async def test_client_bytes_and_topics_match_mos(broker: Mosquitto, sniffer: Sniffer) -> None:
    node = Node(id="esp32_0A1B2C")
    node.add_handler("Sys.GetInfo", lambda ctx, p: RawJSON('{"app":"demo"}'))
    lst = await listen(broker.url("esp32_0A1B2C"), node)
    c = await connect(broker.url("esp32_0A1B2C", client_id="mos-1298498081"), timeout_s=WAIT_S)
    try:
        resp = await c.node.call_frame("Sys.GetInfo", id=1580229426716, timeout_s=WAIT_S)
        assert resp.result == {"app": "demo"}
        resp_topic = "esp32_0A1B2C/rpc-resp/mos-1298498081/rpc"
        await sniffer.wait_topic(resp_topic)
        assert sniffer.snapshot() == [
            (
                "esp32_0A1B2C/rpc",
                b'{"src":"esp32_0A1B2C/rpc-resp/mos-1298498081","dst":"esp32_0A1B2C",'
                b'"id":1580229426716,"method":"Sys.GetInfo"}',
                1,
                False,
            ),
            (
                resp_topic,
                b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"esp32_0A1B2C/rpc-resp/mos-1298498081",'
                b'"result":{"app":"demo"}}',
                1,
                False,
            ),
        ]
        # Nothing was published retained: a new subscriber to '#' gets only what comes next.
        late = Sniffer(broker)
        try:
            late.publish("marker", b"m")
            await late.wait_topic("marker")
            assert [t for t, *_ in late.snapshot()] == ["marker"]
        finally:
            late.close()
    finally:
        await c.close()
        await lst.close()
        await node.close()


async def test_client_html_escapes_on_the_wire(client: Any, sniffer: Sniffer) -> None:
    assert await client.call("Test.Echo", {"s": "<a&b>"}) == {"s": "<a&b>"}
    (req,) = await sniffer.wait_topic("dev1/rpc")  # the sniffer's copy may trail the reply
    assert b'"params":{"s":"\\u003ca\\u0026b\\u003e"}' in req
    assert b"<" not in req and b"&" not in req


async def test_default_client_id_is_mos_int31(client: Any, sniffer: Sniffer) -> None:
    cid = client.channel.client_id
    prefix, _, num = cid.partition("-")
    assert prefix == "mos" and num.isdigit() and 0 <= int(num) < 2**31
    await client.call("Test.Echo", 1)
    (req,) = await sniffer.wait_topic("dev1/rpc")
    assert json.loads(req)["src"] == f"dev1/rpc-resp/{cid}"


async def test_client_dst_override_and_two_devices(broker: Mosquitto, sniffer: Sniffer) -> None:
    n1, _ = make_device("devA")
    n2, _ = make_device("devB")
    l1 = await listen(broker.url(), n1)
    l2 = await listen(broker.url(), n2)
    c1 = await connect(broker.url("devA"), timeout_s=WAIT_S)
    c2 = await connect(broker.url("devB"), timeout_s=WAIT_S)
    try:
        assert await c1.call("Test.Id") == "devA"
        assert await c2.call("Test.Id") == "devB"
        assert await c1.call("Test.Id", dst="devB") == "devB"  # dst picks the device
        # A device calls another device through the broker (its default route).
        assert await n1.call("Test.Id", dst="devB", timeout_s=WAIT_S) == "devB"
        assert json.loads((await sniffer.wait_topic("devA/rpc"))[0])["dst"] == "devA"
        await sniffer.wait_for(lambda msgs: any(t == "devB/rpc" and b'"src":"devA"' in p for t, p, *_ in msgs))
    finally:
        for c in (c1, c2):
            await c.close()
        for lst, n in ((l1, n1), (l2, n2)):
            await lst.close()
            await n.close()


async def test_listen_id_option_and_url_path(broker: Mosquitto) -> None:
    node, _ = make_device("devX")
    lst = cast(tmqtt.MqttListener, await listen(broker.url("", id="alias1"), node))
    c = await connect(broker.url("alias1"), timeout_s=WAIT_S)
    try:
        assert lst.device_id == "alias1" and node.is_local_id("alias1")
        assert await c.call("Test.Echo", 3) == 3
    finally:
        await c.close()
        await lst.close()
        await node.close()


# ---------------------------------------------------------------------------------------------
# the broker going away


async def test_broker_restart_both_sides_recover(broker: Mosquitto, client: Any, device: Any) -> None:
    _, _, lst = device
    assert await client.call("Test.Echo", "before") == "before"
    states: list[bool] = []
    lst.conn.on_state(states.append)
    broker.restart()  # same port (blocks the loop: the lost connection is noticed only after it)
    for _ in range(300):  # both sides first see the broker gone, then come back (bounded: 30 s)
        if False in states and states[-1] is True and client.channel.conn.connects >= 2:
            break
        await asyncio.sleep(0.1)
    await lst.conn.wait_ready(timeout_s=30)
    await client.channel.conn.wait_ready(timeout_s=30)
    assert states[-1] is True and False in states
    assert lst.conn.connects >= 2 and client.channel.conn.connects >= 2
    assert await client.call("Test.Echo", "after") == "after"
    results = await asyncio.gather(*(client.call("Test.Echo", i) for i in range(10)))
    assert results == list(range(10))


async def test_unreachable_broker_is_a_transport_error() -> None:
    port = free_port()
    with pytest.raises(TransportError) as ei:
        await connect(f"mqtt://127.0.0.1:{port}/dev1", timeout_s=2)
    assert isinstance(ei.value, OSError) and "cannot connect" in str(ei.value)
    with pytest.raises(TransportError):
        await listen(f"mqtt://127.0.0.1:{port}", Node(id="d"))


async def test_reconnection_outlasts_a_broker_that_drops_or_never_answers(broker: Mosquitto) -> None:
    """After a crash the broker first accepts connections and never sends the CONNACK, then closes
    them at once: each attempt is abandoned after the CONNECT timeout and the connection keeps
    trying (with backoff) until it is back, resubscribed."""
    async with Gate(broker.port) as gate:
        conn = mqttconn.MqttConnection(mqttconn.BrokerConfig("127.0.0.1", gate.port), reconnect_min_s=0.05,
                                       reconnect_max_s=0.2)  # fmt: skip
        await conn.connect(timeout_s=1.0)  # also the CONNACK wait of every reconnection
        try:
            got: asyncio.Queue[bytes] = asyncio.Queue()
            await conn.subscribe("gate/t", lambda m: got.put_nowait(m.payload))
            states: list[bool] = []
            conn.on_state(states.append)
            gate.plan = ["mute", "mute", "drop", "drop", "drop"]
            gate.cut()
            for _ in range(int(WAIT_S / 0.01)):
                if states:
                    break
                await asyncio.sleep(0.01)
            assert states == [False]  # the loss is seen
            await conn.wait_ready(timeout_s=30)
            assert gate.accepted >= 7 and gate.forwarded >= 2 and not gate.plan  # every bad attempt made
            assert conn.connects >= 2 and conn.attempts >= 7
            async with await mqttconn.open_connection(broker.url()) as other:
                await other.publish("gate/t", b"back")
            assert await asyncio.wait_for(got.get(), WAIT_S) == b"back"
        finally:
            await conn.close()


async def test_sockets_numbered_above_1023_work(broker: Mosquitto) -> None:
    """A process with a few hundred connections has descriptors above 1023, which paho's own
    select() loop cannot watch: its connections there waited for a CONNACK forever (issue #16: 3 %
    of 250 devices in one process never came back after a reboot)."""
    with descriptors_above_1023():
        probe = socket.socket()
        assert probe.fileno() > 1023  # what the next sockets get
        probe.close()
        node, _ = make_device("high1")
        lst = await listen(f"mqtt://127.0.0.1:{broker.port}", node)
        try:
            c = await connect(broker.url("high1"), timeout_s=WAIT_S)
            try:
                assert await c.call("Test.Echo", "above 1023") == "above 1023"
            finally:
                await c.close()
        finally:
            await lst.close()
            await node.close()


async def test_slow_message_callbacks_do_not_make_the_broker_drop_messages(
    mosquitto_broker: Callable[..., Mosquitto],  # noqa: F811
) -> None:
    """Callbacks slower than the messages come (a blocking database write each, as the fleet
    dashboard's): the socket is still read between them, so the backlog waits in this process, not
    in the broker's queue for this client, which drops what overflows (200 messages here; 1000 is
    mosquitto's default)."""
    import time

    broker = mosquitto_broker(extra_config="max_queued_messages 200")
    n = 800
    conn = await mqttconn.open_connection(broker.url())
    got: list[int] = []

    def slow(msg: mqttconn.MqttMessage) -> None:
        got.append(int(msg.payload))
        time.sleep(0.005)  # blocks the loop, as a synchronous database call does

    publisher = (
        "import sys, time\n"
        "import paho.mqtt.client as m\n"
        "c = m.Client(m.CallbackAPIVersion.VERSION2, client_id='load-publisher')\n"
        f"c.connect('127.0.0.1', {broker.port}); c.loop_start()\n"
        f"infos = []\nfor i in range({n}):\n"
        "    infos.append(c.publish('load/t', str(i), qos=1)); time.sleep(0.0025)\n"
        "for info in infos: info.wait_for_publish(60)\n"
        "c.disconnect(); c.loop_stop(); print('sent', flush=True)\n"
    )
    try:
        await conn.subscribe("load/t", slow, qos=1)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", publisher, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert out.strip() == b"sent"
        seen, still = -1, 0
        while len(got) < n and still < 30:  # until all came, or nothing more for a while
            await asyncio.sleep(0.1)
            still = still + 1 if len(got) == seen else 0
            seen = len(got)
        assert got == list(range(n))
    finally:
        await conn.close()


def test_backoff_delay_grows_with_jitter() -> None:
    delays = [[mqttconn.backoff_delay(n, 0.5, 8.0) for n in range(8)] for _ in range(50)]
    for run in delays:
        for n, d in enumerate(run):
            ceiling = min(8.0, 0.5 * 2**n)
            assert ceiling / 2 <= d <= ceiling
    assert len({run[3] for run in delays}) > 1  # jitter: clients do not all retry in the same instant


# ---------------------------------------------------------------------------------------------
# credentials and TLS


async def test_user_password_from_url(mosquitto_broker: Callable[..., Mosquitto]) -> None:  # noqa: F811
    b = mosquitto_broker(users={"alice": "s3cret"})
    node, _ = make_device("dev1")
    lst = await listen(b.url(user="alice", password="s3cret"), node)
    c = await connect(b.url("dev1", user="alice", password="s3cret"), timeout_s=WAIT_S)
    try:
        assert await c.call("Test.Echo", "auth") == "auth"
        with pytest.raises(TransportError) as ei:
            await connect(b.url("dev1", user="alice", password="wrong"), timeout_s=WAIT_S)
        assert "refused" in str(ei.value)
        with pytest.raises(TransportError):
            await connect(b.url("dev1"), timeout_s=WAIT_S)  # anonymous is off
    finally:
        await c.close()
        await lst.close()
        await node.close()


# paho does not close its socket when the TLS handshake fails (wrong CA); the GC reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
async def test_tls_with_and_without_ca(mosquitto_broker: Callable[..., Mosquitto], tmp_path: Any) -> None:  # noqa: F811
    b = mosquitto_broker(tls=True)
    assert b.tls_files is not None
    ca = str(b.tls_files.ca_cert)
    node, _ = make_device("dev1")
    lst = await listen(b.url(ca=ca), node)
    try:
        verified = await connect(b.url("dev1", ca=ca), timeout_s=WAIT_S)
        assert await verified.call("Test.Echo", "tls") == "tls"
        await verified.close()
        unverified = await connect(b.url("dev1", insecure="1"), timeout_s=WAIT_S)  # as mos without a CA
        assert await unverified.call("Test.Echo", "tls2") == "tls2"
        await unverified.close()
        with pytest.raises(TransportError):  # no CA: the system CAs, which do not know the test CA
            await connect(b.url("dev1"), timeout_s=WAIT_S)
        other = make_tls_files(tmp_path / "other")
        with pytest.raises(TransportError):
            await connect(b.url("dev1", ca=str(other.ca_cert)), timeout_s=WAIT_S)
        with pytest.raises(TransportError):
            await connect(b.url("dev1", ca=str(tmp_path / "missing.pem")), timeout_s=WAIT_S)
    finally:
        await lst.close()
        await node.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
async def test_tls_client_certificate(mosquitto_broker: Callable[..., Mosquitto]) -> None:  # noqa: F811
    b = mosquitto_broker(tls=True, require_client_cert=True)
    assert b.tls_files is not None
    files = b.tls_files
    opts = {"ca": str(files.ca_cert), "cert": str(files.client_cert), "key": str(files.client_key)}
    node, _ = make_device("dev1")
    lst = await listen(b.url(**opts), node)
    try:
        c = await connect(b.url("dev1", **opts), timeout_s=WAIT_S)
        assert await c.call("Test.Echo", "mtls") == "mtls"
        await c.close()
        with pytest.raises(TransportError):
            await connect(b.url("dev1", ca=str(files.ca_cert)), timeout_s=WAIT_S)  # no client certificate
    finally:
        await lst.close()
        await node.close()


# ---------------------------------------------------------------------------------------------
# URL handling


def test_url_defaults_and_options() -> None:
    cfg = mqttconn.BrokerConfig.from_url(parse_url("mqtt://u:p%40ss@broker/esp32_0A1B2C"))
    assert (cfg.host, cfg.port, cfg.tls, cfg.user, cfg.password, cfg.qos) == ("broker", 1883, False, "u", "p@ss", 1)
    cfg = mqttconn.BrokerConfig.from_url("mqtts://broker/dev?ca=/x/ca.pem&qos=0&client_id=me&keepalive=5")
    assert (cfg.port, cfg.tls, cfg.ca, cfg.qos, cfg.client_id, cfg.keepalive_s) == (8883, True, "/x/ca.pem", 0, "me", 5)
    assert mqttconn.BrokerConfig.from_url("mqtt://broker:1999/d").port == 1999
    # mqtts:// verifies the broker against the system CAs unless ?insecure=1 (issue #14)
    strict = mqttconn.BrokerConfig.from_url("mqtts://broker/d").ssl_context()
    assert strict is not None and strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    loose = mqttconn.BrokerConfig.from_url("mqtts://broker/d?insecure=1").ssl_context()
    assert loose is not None and loose.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    "url",
    [
        "mqtt://broker/d?qos=3",
        "mqtt://broker/d?keepalive=no",
        "mqtt://broker/d?ca=/x.pem",  # TLS options need mqtts://
        "mqtts://broker/d?key=/k.pem",  # a key without a cert
        "mqtt://broker/d?insecure=1",  # TLS options need mqtts://
        "mqtts://broker/d?insecure=yes",
        "mqtts://broker/d?insecure=1&ca=/x.pem",  # verify with a CA, or verify nothing: not both
        "mqtt:///d",  # no broker
        "mqtt://broker/d?codec=cbor",
    ],
)
async def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        await registry.open_client(url)


async def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(UsageError) as ei:
        await registry.open_client("mqtt://broker/d?bogus=1")
    assert "client_id" in str(ei.value) and "qos" in str(ei.value)


async def test_bad_device_id_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        await registry.open_client("mqtt://127.0.0.1:1/dev+1")


def test_missing_paho_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)
    with pytest.raises(TransportError) as ei:
        mqttconn._paho()
    assert "mgrpc[mqtt]" in str(ei.value)
    with pytest.raises(TransportError, match=r"mgrpc\[mqtt\]"):
        mqttconn.MqttConnection(mqttconn.BrokerConfig("b", 1))


# ---------------------------------------------------------------------------------------------
# MqttConnection (for the shadow service and the dashboard) and the console helper


async def test_connection_publish_subscribe(broker: Mosquitto) -> None:
    conn = await mqttconn.open_connection(broker.url())
    try:
        got: list[tuple[str, bytes]] = []
        twice: list[str] = []

        def cb(msg: mqttconn.MqttMessage) -> None:
            got.append((msg.topic, msg.payload))

        await conn.subscribe("fleet/+/state", cb)
        await conn.subscribe("fleet/#", cb)  # overlapping filters: still once per message
        await conn.subscribe("fleet/#", lambda m: twice.append(m.topic))
        await conn.publish("fleet/d1/state", b'{"on":true}')  # waits for the PUBACK
        await conn.publish("fleet/d1/other", "text", qos=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while len(twice) < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert got == [("fleet/d1/state", b'{"on":true}'), ("fleet/d1/other", b"text")]
        assert twice == ["fleet/d1/state", "fleet/d1/other"]
        await conn.unsubscribe("fleet/#")
        await conn.unsubscribe("fleet/+/state", cb)
        with pytest.raises(UsageError):
            await conn.publish("bad/#", b"x")
    finally:
        await conn.close()
    assert conn.closed
    with pytest.raises(TransportError):
        await conn.publish("x", b"y")


async def test_log_subscribe(broker: Mosquitto, sniffer: Sniffer) -> None:
    lines: list[str] = []
    conn = await tmqtt.log_subscribe(broker.url("dev1"), lines.append)
    try:
        sniffer.publish("dev1/log", b"boot ok\n", qos=0)
        sniffer.publish("dev2/log", b"not mine", qos=0)
        sniffer.publish("dev1/log", b"\xffbad utf8", qos=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while len(lines) < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert lines == ["boot ok\n", "\ufffdbad utf8"]
    finally:
        await conn.close()


async def test_last_will_published_when_a_process_is_killed(broker: Mosquitto) -> None:
    import json as _json
    import signal
    import sys

    from transports.mqttconn import open_connection

    watcher = await open_connection(f"mqtt://127.0.0.1:{broker.port}", client_id="watcher")
    seen: asyncio.Queue[bytes] = asyncio.Queue()
    await watcher.subscribe("victim/status", lambda msg: seen.put_nowait(bytes(msg.payload)))
    script = (
        "import asyncio, json\n"
        "from transports.mqttconn import open_connection\n"
        "async def main():\n"
        f"    c = await open_connection('mqtt://127.0.0.1:{broker.port}', client_id='victim',\n"
        "        will=('victim/status', json.dumps({'online': False, 'id': 'victim'}).encode(), 1, True))\n"
        "    await c.publish('victim/status', b'{\"online\": true}', qos=1, retain=True)\n"
        "    print('up', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"up"
        assert _json.loads(await asyncio.wait_for(seen.get(), 10)) == {"online": True}
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert _json.loads(await asyncio.wait_for(seen.get(), 10)) == {"online": False, "id": "victim"}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watcher.close()


async def test_connection_routes_follow_subscriptions(broker: Mosquitto) -> None:
    """A topic's callbacks are remembered: a callback subscribed or removed later still counts."""
    conn = await mqttconn.open_connection(broker.url())
    try:
        got: list[str] = []

        async def publish_and_wait(n: int) -> None:
            await conn.publish("fleet/d1/state", b"x")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while len(got) < n:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # nothing more arrives
            assert len(got) == n, got

        def a(msg: mqttconn.MqttMessage) -> None:
            got.append("a")

        def b(msg: mqttconn.MqttMessage) -> None:
            got.append("b")

        await conn.subscribe("fleet/+/state", a)
        await publish_and_wait(1)
        await conn.subscribe("fleet/#", b)  # a second callback for a topic already routed
        await publish_and_wait(3)
        assert sorted(got[1:]) == ["a", "b"]
        await conn.unsubscribe("fleet/+/state", a)
        await publish_and_wait(4)
        assert got[-1] == "b"
    finally:
        await conn.close()
