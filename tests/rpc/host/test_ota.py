"""rpc.host.ota: the mos ota sequence, pipelining, resume, retries, failure messages.

Most tests run against a small fake OTA device (conftest.FakeOta) so faults can be injected exactly;
the end-to-end tests at the bottom use the real virtual device over loop:// and ws://.
"""

from __future__ import annotations

import asyncio

import pytest

import transports
from rpc.client import AsyncClient
from rpc.host.ota import OtaError, ota_update, wait_and_commit
from tests.rpc.host.fakeota import firmware, names

MOS_CHUNK = 512  # the tests of mos's write sequence (and faults at 512-byte offsets) pin mos's chunk size

# -- the sequence ---------------------------------------------------------------------------------


async def test_sequence_messages_and_exact_begin_args(fake):
    fw = firmware(1300)
    client = await fake.connect()
    msgs: list[str] = []
    progress: list[tuple[int, int]] = []
    res = await ota_update(
        client, fw, chunk_size=MOS_CHUNK, window=1, on_message=msgs.append,
        on_progress=lambda d, t: progress.append((d, t)),
    )  # fmt: skip
    await client.close()
    assert fake.calls == ["OTA.Status", "OTA.Begin", "OTA.Write", "OTA.Write", "OTA.Write", "OTA.End"]
    assert fake.begin_params_text == ['{"timeout":600,"commit_timeout":300,"size":1300}']
    assert msgs == [
        "Getting current OTA status...",
        'Starting an update (args: {"timeout":600,"commit_timeout":300,"size":1300})...',
        "Writing data...",
        "Finalizing update...",
    ]
    assert bytes(fake.data) == fw and fake.state == 3
    assert progress[-1] == (1300, 1300) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert (res.size, res.resumed_from, res.writes, res.retries) == (1300, 0, 3, 0)


async def test_timeouts_go_into_begin_and_custom_args_are_verbatim(fake):
    client = await fake.connect()
    await ota_update(client, firmware(100), commit_timeout_s=60, update_timeout_s=120)
    fake.state = 0
    await ota_update(client, firmware(100), begin_args='{"size": 100, "commit_timeout": 5}')
    await client.close()
    assert fake.begin_params_text == [
        '{"timeout":120,"commit_timeout":60,"size":100}',
        '{"size": 100, "commit_timeout": 5}',
    ]


async def test_chunk_size_sets_write_count(fake, tmp_path):
    path = tmp_path / "fw.zip"
    path.write_bytes(firmware(1000))
    client = await fake.connect()
    res = await ota_update(client, path, chunk_size=100)
    await client.close()
    assert res.writes == 10 and bytes(fake.data) == path.read_bytes()


@pytest.mark.parametrize("window", [1, 8])
async def test_window_gives_same_device_data(fake, window):
    fw = firmware(20000)
    client = await fake.connect()
    await ota_update(client, fw, window=window)
    await client.close()
    assert bytes(fake.data) == fw
    if window == 1:
        assert fake.max_pending_seen == 1
    else:
        assert 1 < fake.max_pending_seen <= window


@pytest.mark.parametrize("window", [1, 8])
async def test_lost_reply_is_retried_as_duplicate(fake, window):
    fw = firmware(6000)
    fake.drop_reply_once = {1024}
    client = await fake.connect()
    res = await ota_update(client, fw, chunk_size=MOS_CHUNK, window=window, timeout_s=0.3)
    await client.close()
    assert bytes(fake.data) == fw
    assert res.retries >= 1 and fake.state == 3


@pytest.mark.parametrize("window", [1, 8])
async def test_refused_write_recovers_within_attempts(fake, window):
    fw = firmware(6000)
    fake.fail_write = {2048: 2}  # two refusals, the third attempt passes
    client = await fake.connect()
    res = await ota_update(client, fw, chunk_size=MOS_CHUNK, window=window)
    await client.close()
    assert bytes(fake.data) == fw and res.retries == 2


# -- failure messages ---------------------------------------------------------------------------------


async def test_status_failure_message(fake):
    fake.fail_status = True
    client = await fake.connect()
    with pytest.raises(OtaError, match=r"^unable to get current OTA status: remote error -1: status broken"):
        await ota_update(client, firmware(100))
    await client.close()
    assert fake.calls == ["OTA.Status"]


@pytest.mark.parametrize("state", [1, 3])
async def test_update_in_progress_message(fake, state):
    fake.state, fake.size = state, 999  # a different size: not ours to resume
    client = await fake.connect()
    with pytest.raises(OtaError, match=rf"^update is already in progress \({state}\), call OTA.End$"):
        await ota_update(client, firmware(100))
    await client.close()
    assert "OTA.Begin" not in fake.calls


async def test_no_resume_refuses_update_in_progress(fake):
    fake.state, fake.size = 1, 100
    client = await fake.connect()
    with pytest.raises(OtaError, match=r"update is already in progress \(1\), call OTA.End"):
        await ota_update(client, firmware(100), resume=False)
    await client.close()


async def test_begin_failure_message(fake):
    fake.fail_begin = True
    client = await fake.connect()
    with pytest.raises(OtaError, match=r"^unable to start an update: remote error -1: Update already in progress"):
        await ota_update(client, firmware(100))
    await client.close()


@pytest.mark.parametrize("window", [1, 8])
async def test_write_failure_aborts_with_offset(fake, window):
    fake.fail_write = {1536: 3}
    client = await fake.connect()
    with pytest.raises(OtaError, match=r"^write failed at offset 1536: remote error -1: flash write error"):
        await ota_update(client, firmware(6000), chunk_size=MOS_CHUNK, window=window)
    await client.close()
    assert fake.calls[-1] == "OTA.End" and fake.state == 0  # aborted by OTA.End
    assert bytes(fake.data) == firmware(6000)[:1536]


async def test_end_error_is_the_result(fake):
    fake.end_error = "Invalid CRC"
    client = await fake.connect()
    with pytest.raises(OtaError, match=r"^remote error -1: Invalid CRC$"):
        await ota_update(client, firmware(600))
    await client.close()


async def test_bad_options_rejected_before_any_call(fake):
    client = await fake.connect()
    with pytest.raises(ValueError, match="window"):
        await ota_update(client, firmware(10), window=25)
    with pytest.raises(ValueError, match="not a valid JSON"):
        await ota_update(client, firmware(10), begin_args="{bad")
    with pytest.raises(OtaError, match="unable to read firmware file"):
        await ota_update(client, "/nonexistent/fw.zip")
    await client.close()
    assert fake.calls == []


# -- resume ------------------------------------------------------------------------------------------


def cut_at(client_box: list[AsyncClient], at: int):
    """A progress callback that closes the current client's channel once ``at`` bytes are acked."""
    done = {"cut": False}

    def cb(d: int, t: int) -> None:
        if d >= at and not done["cut"]:
            done["cut"] = True
            asyncio.get_running_loop().create_task(client_box[0].channel.close())

    return cb


@pytest.mark.parametrize("window", [1, 8])
async def test_resume_after_cut_with_reconnect(fake, window):
    fw = firmware(30000)
    box = [await fake.connect()]

    async def reconnect() -> AsyncClient:
        box[0] = await fake.connect()
        return box[0]

    res = await ota_update(box[0], fw, window=window, on_progress=cut_at(box, 15000), reconnect=reconnect)
    await res.client.close()
    assert res.reconnects == 1 and res.client is box[0]
    assert bytes(fake.data) == fw and fake.state == 3
    assert fake.calls.count("OTA.Begin") == 1


async def test_device_lost_the_update_during_a_cut(fake):
    fw = firmware(30000)
    box = [await fake.connect()]
    cut = cut_at(box, 15000)

    def cb(d: int, t: int) -> None:
        if d >= 15000:
            fake.state = 0  # as if the device rebooted while the link was down
        cut(d, t)

    async def reconnect() -> AsyncClient:
        box[0] = await fake.connect()
        return box[0]

    with pytest.raises(OtaError, match=r"^write failed at offset \d+: the device is no longer updating \(state 0: x\)$"):
        await ota_update(box[0], fw, window=4, on_progress=cb, reconnect=reconnect)
    await box[0].close()


async def test_failed_update_closes_the_client_it_reopened(fake):
    fw = firmware(30000)
    box = [await fake.connect()]
    cut = cut_at(box, 15000)
    opened: list[AsyncClient] = []

    def cb(d: int, t: int) -> None:
        if d >= 15000:
            fake.state = 0  # the device gave up the update while the link was down
        cut(d, t)

    async def reconnect() -> AsyncClient:
        box[0] = await fake.connect()
        opened.append(box[0])
        return box[0]

    with pytest.raises(OtaError, match="no longer updating"):
        await ota_update(box[0], fw, window=4, on_progress=cb, reconnect=reconnect)
    # the caller never sees a client ota_update opened itself, so ota_update must close it
    assert len(opened) == 1 and opened[0].channel.closed


async def test_reconnect_failure_is_reported(fake):
    box = [await fake.connect()]

    async def reconnect() -> AsyncClient:
        raise ConnectionRefusedError("refused")

    with pytest.raises(OtaError, match="connection lost and could not be re-opened: refused"):
        await ota_update(box[0], firmware(30000), chunk_size=MOS_CHUNK, on_progress=cut_at(box, 15000),
                         reconnect=reconnect, reconnect_attempts=2)  # fmt: skip
    assert fake.state == 1  # left resumable


async def test_resume_after_client_restart(fake):
    fw = firmware(30000)
    box = [await fake.connect()]
    with pytest.raises(OtaError, match="write failed at offset"):
        await ota_update(box[0], fw, chunk_size=MOS_CHUNK, window=8, on_progress=cut_at(box, 15000))
    assert fake.state == 1 and 15000 <= len(fake.data) < 30000
    had = len(fake.data)
    client = await fake.connect()
    msgs: list[str] = []
    res = await ota_update(client, fw, on_message=msgs.append)
    await client.close()
    assert res.resumed_from == had and res.bytes_sent == 30000 - had
    assert f"Resuming the update in progress at offset {had} of 30000..." in msgs
    assert fake.calls.count("OTA.Begin") == 1
    assert bytes(fake.data) == fw and fake.state == 3


# -- end to end against the virtual device ---------------------------------------------------------


@pytest.fixture(params=["loop", "ws"])
async def vdev(request, tmp_path):
    from services.device import VirtualDevice

    url = f"loop://vdev{next(names)}" if request.param == "loop" else "ws://127.0.0.1:0/rpc"
    dev = VirtualDevice(id="esp32_E2E", state_dir=tmp_path / "dev", listen=[url], listen_fn=transports.listen)
    await dev.start()
    yield dev
    await dev.stop()


async def test_e2e_update_reboot_commit(vdev):
    from updater.bundle import make_virtual_bundle

    fw = make_virtual_bundle("esp32", "2.0", app_size=16384)
    client = await transports.connect(vdev.urls[0], timeout_s=5.0)
    res = await ota_update(client, fw)
    await res.client.close()
    await vdev.wait_booted(boots=2)
    cr = await wait_and_commit(
        lambda: transports.connect(vdev.urls[0], timeout_s=5.0), timeout_s=20, expected_version="2.0",
        initial_delay_s=0.2, poll_interval_s=0.2,
    )  # fmt: skip
    assert (cr.fw_version, cr.already_committed) == ("2.0", False)
    assert vdev.storage.is_committed and vdev.boot_info.version == "2.0"


async def test_e2e_resume_after_cut(vdev):
    from updater.bundle import make_virtual_bundle

    fw = make_virtual_bundle("esp32", "3.0", app_size=32768)
    box = [await transports.connect(vdev.urls[0], timeout_s=5.0)]

    async def reconnect() -> AsyncClient:
        box[0] = await transports.connect(vdev.urls[0], timeout_s=5.0)
        return box[0]

    res = await ota_update(box[0], fw, on_progress=cut_at(box, len(fw) // 2), reconnect=reconnect)
    await res.client.close()
    assert res.reconnects == 1
    info = await vdev.wait_booted(boots=2)
    assert info.version == "3.0" and not vdev.storage.is_committed


async def test_e2e_ws_through_latency_proxy_with_dropped_link(tmp_path):
    """A real TCP drop (the proxy aborts the sockets) mid-update; the client reconnects and resumes."""
    from services.device import VirtualDevice
    from transports.latency import LatencyProxy
    from updater.bundle import make_virtual_bundle

    dev = VirtualDevice(id="esp32_PX", state_dir=tmp_path / "dev", listen=["ws://127.0.0.1:0/rpc"],
                        listen_fn=transports.listen)  # fmt: skip
    await dev.start()
    host, port = dev.urls[0].split("//")[1].split("/")[0].rsplit(":", 1)
    proxy = LatencyProxy(host, int(port), delay_s=0.002)
    await proxy.start()
    url = proxy.url_for(dev.urls[0])
    try:
        fw = make_virtual_bundle("esp32", "5.0", app_size=32768)
        state = {"cut": False}

        def cb(d: int, t: int) -> None:
            if d >= t // 2 and not state["cut"]:
                state["cut"] = True
                asyncio.get_running_loop().create_task(proxy.cut())

        async def reconnect() -> AsyncClient:
            return await transports.connect(url, timeout_s=5.0)

        client = await reconnect()
        res = await ota_update(client, fw, timeout_s=5.0, on_progress=cb, reconnect=reconnect)
        await res.client.close()
        assert res.reconnects == 1 and res.retries > 0
        info = await dev.wait_booted(boots=2)
        assert info.version == "5.0"
    finally:
        await proxy.close()
        await dev.stop()


# -- chunk size from the device ---------------------------------------------------------------------


async def test_chunk_size_fits_the_device_frame_limit(fake):
    fake.frame_limit = 2048
    fw = firmware(20000)
    client = await fake.connect()
    msgs: list[str] = []
    res = await ota_update(client, fw, on_message=msgs.append)
    await client.close()
    assert bytes(fake.data) == fw and fake.state == 3
    assert 1500 < fake.largest_write_frame <= 2048  # big chunks (512 B ones make 0.8 KB frames), all within
    assert any(m.startswith("Device limits: rpc.max_frame_size 2048; writing ") for m in msgs), msgs
    assert res.retries == 0


async def test_a_given_chunk_size_too_big_for_the_device_is_shrunk_and_said(fake):
    """--chunk-size 4096 against a device with rpc.max_frame_size 4096: every frame would be dropped."""
    fake.frame_limit = fake.drop_frames_over = 4096
    fw = firmware(30000)
    client = await fake.connect()
    msgs: list[str] = []
    await ota_update(client, fw, chunk_size=4096, on_message=msgs.append)
    await client.close()
    assert bytes(fake.data) == fw and fake.state == 3
    assert any(m.startswith("Chunk size 4096 makes frames too big for the device (rpc.max_frame_size 4096)")
               for m in msgs), msgs  # fmt: skip


async def test_a_device_that_drops_big_frames_silently_gets_smaller_chunks(fake):
    """No rpc.max_frame_size offered and big frames dropped without a word: halve until answered."""
    fake.drop_frames_over = 1500
    fw = firmware(20000)
    client = await fake.connect()
    msgs: list[str] = []
    res = await ota_update(client, fw, timeout_s=0.5, on_message=msgs.append)
    await client.close()
    assert bytes(fake.data) == fw and fake.state == 3
    said = [m for m in msgs if m.startswith("The device did not answer a ")]
    assert len(said) >= 1 and said[-1].endswith("-byte chunks.")
    assert fake.largest_write_frame <= 1500 and res.retries == len(said)


async def test_stock_style_ws_device_that_stalls_on_big_messages(tmp_path):
    """A device that stops answering a connection after a big message (Mongoose OS's rpc-ws does so
    over 3064 bytes): the first write alone finds out, the client reconnects with smaller chunks."""
    from services.device import VirtualDevice
    from updater.bundle import make_virtual_bundle

    dev = VirtualDevice(
        id="esp32_STALL", state_dir=tmp_path / "dev", listen=["ws://127.0.0.1:0/rpc?stall_over=1500"],
        listen_fn=transports.listen,
    )  # fmt: skip
    await dev.start()
    try:
        url = dev.urls[0].split("?", 1)[0]
        fw = make_virtual_bundle("esp32", "2.0", app_size=16384)
        msgs: list[str] = []
        client = await transports.connect(url, timeout_s=5.0)
        res = await ota_update(
            client, fw, timeout_s=1.0, on_message=msgs.append,
            reconnect=lambda: transports.connect(url, timeout_s=5.0),
        )  # fmt: skip
        await res.client.close()
        assert any(m.startswith("The device did not answer a 2048-byte write") for m in msgs), msgs
        assert res.chunk_size < 2048 and res.reconnects >= 1
        await dev.wait_booted(boots=2)
        assert dev.boot_info is not None and dev.boot_info.version == "2.0"
    finally:
        await dev.stop()


async def test_wait_and_commit_reports_a_revert_instead_of_waiting_it_out(vdev):
    """The device came back on the old firmware, committed (the boot loader fell back): the wait
    ends after settle_s with that, instead of polling until the commit timeout (300 s by default)."""
    import time

    from updater.bundle import make_virtual_bundle

    fw = make_virtual_bundle("esp32", "2.0", app_size=16384)
    client = await transports.connect(vdev.urls[0], timeout_s=5.0)
    res = await ota_update(client, fw)
    await res.client.close()
    await vdev.wait_booted(boots=2)
    assert vdev.storage.revert()  # what a reset during the first boot leads to
    await vdev.reboot()
    assert vdev.boot_info.version == "1.0" and vdev.storage.is_committed
    t0 = time.monotonic()
    with pytest.raises(OtaError, match=r"reverted: device runs 1.0 \(committed\)"):
        await wait_and_commit(
            lambda: transports.connect(vdev.urls[0], timeout_s=5.0), timeout_s=120, expected_version="2.0",
            initial_delay_s=0.1, poll_interval_s=0.1, settle_s=0.5,
        )  # fmt: skip
    assert time.monotonic() - t0 < 60
