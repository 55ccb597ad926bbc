"""UpdaterContext: applying fw.zip streams to the inactive slot, state machine, chunking, progress."""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from pathlib import Path

import pytest

from updater.bundle import BundlePart, build_bundle, make_virtual_bundle
from updater.context import UpdaterContext, UpdaterState
from updater.flash import Flash
from updater.partitions import default_layout, make_layout
from updater.storage import DeviceStorage

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors"
FS_SIZE = 32 << 10
LAYOUT = make_layout(sector_size=4096, app_size=16 << 10, fs_size=FS_SIZE)
OLD_FILES = {"conf0.json": b'{"v": 1}', "conf9.json": b'{"user": true}'}


def old_app() -> bytes:
    z = zipfile.ZipFile(io.BytesIO(make_virtual_bundle("esp32", "1.0", app_size=6000, fs_size=FS_SIZE)))
    return z.read("mgrpc-virtual.bin")


def device(layout=LAYOUT) -> DeviceStorage:  # type: ignore[no-untyped-def]
    st = DeviceStorage.in_memory(layout=layout)
    st.factory_init(old_app(), OLD_FILES)
    st.boot()
    return st


def new_bundle(**kw: object) -> bytes:
    args: dict[str, object] = {
        "app_size": 9000,
        "fs_size": FS_SIZE,
        "fs_files": {"conf0.json": b'{"v": 2}', "index.html": b"<html/>"},
    }
    args.update(kw)
    return make_virtual_bundle("esp32", "2.0", **args)  # type: ignore[arg-type]


def apply(st: DeviceStorage, data: bytes, sizes: list[int] | None = None, **kw: object) -> UpdaterContext:
    ctx = UpdaterContext(st, arch="esp32", **kw)  # type: ignore[arg-type]
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        r = ctx.process(data[pos : pos + n])
        pos += n
        i += 1
        if r != 0:
            break
    ctx.finish()
    return ctx


def test_update_switches_slot_and_merges_fs() -> None:
    st = device()
    ctx = apply(st, new_bundle(), commit_timeout_s=300)
    assert ctx.result > 0 and ctx.status_message == "Update applied, finalizing"
    assert ctx.reboot_required and ctx.state is UpdaterState.FINISHED and ctx.target_slot == 1
    assert st.get_boot_state() == {"active_slot": 1, "is_committed": False, "revert_slot": 0, "commit_timeout": 300}
    info = st.boot()
    assert (info.slot, info.first_boot, info.commit_timeout_s, info.version) == (1, True, 300, "2.0")
    assert info.merged_files == ("conf9.json",)
    assert st.fs().files() == {
        "conf0.json": b'{"v": 2}',  # shipped file wins
        "conf9.json": b'{"user": true}',  # user's config survives
        "index.html": b"<html/>",
    }
    assert st.commit()
    assert st.boot().slot == 1
    # and the app bytes are the manifest's
    z = zipfile.ZipFile(io.BytesIO(new_bundle()))
    assert st.read_app() == z.read("mgrpc-virtual.bin")


def test_state_sequence() -> None:
    st = device()
    data = new_bundle()
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.state is UpdaterState.INITED
    seen = []
    for b in data:
        assert ctx.process(bytes([b])) == 0
        if not seen or seen[-1] != ctx.state:
            seen.append(ctx.state)
    S = UpdaterState
    assert seen == [
        S.WAITING_MANIFEST_HEADER,
        S.WAITING_MANIFEST,
        S.WAITING_FILE_HEADER,
        S.WAITING_FILE,
        S.WAITING_FILE_HEADER,
        S.WAITING_FILE,
        S.WAITING_FILE_HEADER,
        S.WRITE_FINISHED,
    ]
    assert ctx.bytes_processed == len(data)
    assert ctx.finish() == 1 and ctx.state is S.FINISHED


def run_chunked(data: bytes, sizes: list[int] | None) -> bytes:
    st = device()
    ctx = apply(st, data, sizes)
    assert ctx.result == 1, ctx.status_message
    return st.flash.snapshot()


def test_chunking_gives_identical_flash() -> None:
    data = new_bundle()
    whole = run_chunked(data, None)
    rng = random.Random(7)
    random_sizes = [rng.randint(1, 3000) for _ in range(200)]
    for sizes in ([1], [7], [512], random_sizes):
        assert run_chunked(data, sizes) == whole, sizes


def test_only_inactive_slot_written_before_finish() -> None:
    st = device()
    writes: list[tuple[int, int]] = []
    real_write, real_erase, real_run = st.flash.write, st.flash.erase_sector, st.flash.write_run
    sector = st.flash.sector_size

    def write(addr: int, data: bytes) -> None:
        writes.append((addr, len(data)))
        real_write(addr, data)

    def write_run(addr: int, data: bytes, *, chunk_size: int, erased_to: int, start: int = 0, stop: int | None = None,
                  head: bytes = b"") -> int:  # fmt: skip
        # The run programs [addr, addr+len) and may erase from erased_to to the end of its last sector.
        end = addr + len(head) + len(data[start:stop])
        lo = min(addr, erased_to)
        writes.append((lo, -(-end // sector) * sector - lo))
        return real_run(addr, data, chunk_size=chunk_size, erased_to=erased_to, start=start, stop=stop, head=head)

    def erase_sector(index: int) -> None:
        writes.append((index * st.flash.sector_size, st.flash.sector_size))
        real_erase(index)

    st.flash.write = write  # type: ignore[method-assign]
    st.flash.erase_sector = erase_sector  # type: ignore[method-assign]
    st.flash.write_run = write_run  # type: ignore[method-assign]
    before = st.flash.snapshot()
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.process(new_bundle()) == 0
    after = st.flash.snapshot()
    changed = [i for i in range(0, len(after), sector) if after[i : i + sector] != before[i : i + sector]]
    assert changed and all(any(p.offset <= i < p.end for p in (LAYOUT.app[1], LAYOUT.fs[1])) for i in changed)
    allowed = [LAYOUT.app[1], LAYOUT.fs[1]]
    assert writes
    for addr, n in writes:
        assert any(p.offset <= addr and addr + n <= p.end for p in allowed), hex(addr)
    writes.clear()
    assert ctx.finish() == 1
    assert writes and all(LAYOUT.bootcfg[0].offset <= a < LAYOUT.bootcfg[1].end for a, _ in writes)


def test_progress_callback() -> None:
    st = device()
    data = new_bundle()
    calls: list[tuple[int, int | None]] = []
    apply(st, data, [4096], total_size=len(data), on_progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_same_version_is_success_without_reboot() -> None:
    st = device()
    before = st.flash.snapshot()
    data = make_virtual_bundle("esp32", "1.0", app_size=9000, fs_size=FS_SIZE)
    ctx = UpdaterContext(st, arch="esp32", ignore_same_version=True)
    assert ctx.process(data) == 1
    assert ctx.status_message == "Version is the same as current"
    assert ctx.finish() == 1 and not ctx.reboot_required
    assert st.flash.snapshot() == before
    ctx = apply(st, data)  # without the flag the same version is installed again
    assert ctx.result == 1 and ctx.reboot_required


def test_same_version_is_recognised_with_a_long_build_id() -> None:
    """The boot config keeps at most 64 bytes of build_id (32 of version): a polling device must
    still see that the bundle it runs is the one offered, or it would reinstall it at every poll."""
    st = device()
    data = make_virtual_bundle(
        "esp32", "1.0-" + "v" * 40, app_size=9000, fs_size=FS_SIZE, build_id="20260101-000000/" + "b" * 80
    )
    assert apply(st, data).reboot_required
    st.boot()
    assert st.commit()
    ctx = UpdaterContext(st, arch="esp32", ignore_same_version=True)
    assert ctx.process(data) == 1
    assert ctx.status_message == "Version is the same as current" and not ctx.reboot_required


def test_app_only_bundle_copies_running_fs() -> None:
    st = device()
    st.fs().write("runtime.txt", b"state")
    app = b"\x01" * 5000
    data = build_bundle(
        platform="esp32", version="3.0", build_id="b3", parts=[BundlePart("app", app, {"type": "app", "src": "a.bin"})]
    )
    ctx = apply(st, data)
    assert ctx.result == 1, ctx.status_message
    info = st.boot()
    assert (info.slot, info.merged_files) == (1, ())
    assert st.fs().files() == {**OLD_FILES, "runtime.txt": b"state"}
    assert st.read_app() == app


def test_other_parts_are_skipped() -> None:
    st = device()
    parts = [
        BundlePart("boot", b"B" * 3000, {"type": "boot", "src": "bootloader.bin", "addr": 4096}),
        BundlePart("app", b"A" * 3000, {"type": "app", "src": "app.bin"}),
        BundlePart("nvs", None, {"type": "nvs", "fill": 255, "size": 4096}),
    ]
    data = build_bundle(platform="esp32", version="3.0", build_id="b3", parts=parts, dir_prefix="fw-3.0")
    ctx = apply(st, data)
    assert ctx.result == 1, ctx.status_message
    assert st.read_app(1) == b"A" * 3000
    assert b"BBBB" not in st.flash.snapshot()


def test_deflate_only_when_allowed() -> None:
    st = device()
    data = new_bundle(compress=True)
    ctx = apply(st, data)
    assert ctx.result < 0 and ctx.status_message == "Cannot handle compressed .zip"
    ctx = apply(st, data, allow_deflate=True)
    assert ctx.result == 1, ctx.status_message


def test_signed_bundle() -> None:
    pytest.importorskip("cryptography")
    from updater import signing

    key = signing.generate_key()
    pub = signing.public_key_b64(key)
    data = new_bundle(sign_keys=[key])
    st = device()
    ctx = apply(st, data, keys=[pub], sig_req_mask=1)
    assert ctx.result == 1, ctx.status_message
    assert ctx.sig_check_result == 1


def test_vector_bundle_accepted_for_esp32() -> None:
    path = VECTORS / "fw_minimal_generated.zip"
    if not path.exists():
        pytest.skip("../shared/vectors not present")
    data = path.read_bytes()
    st = device(default_layout())
    ctx = apply(st, data, [100])
    assert ctx.result == 1, ctx.status_message
    z = zipfile.ZipFile(io.BytesIO(data))
    assert st.flash.read(default_layout().app[1].offset, 1000) == z.read("demo.bin")
    fs_bytes = st.flash.read(default_layout().fs[1].offset, 300)
    assert hashlib.sha1(fs_bytes).hexdigest() == "3613f1da2e1f23c915820c02738cfadf38db98cd"
    # Its fs.img is not a LittleFS image: the first boot cannot mount it and falls back (init failed).
    info = st.boot()
    assert (info.slot, info.reverted) == (0, True) and "does not mount" in info.reason
    assert st.get_boot_state()["active_slot"] == 0 and st.fs().files() == OLD_FILES


def test_file_backed_device(tmp_path: Path) -> None:
    path = tmp_path / "dev.flash"
    with DeviceStorage.open(path, layout=LAYOUT) as st:
        st.factory_init(old_app(), OLD_FILES)
        st.boot()
        assert apply(st, new_bundle()).result == 1
    with DeviceStorage.open(path, layout=LAYOUT) as st:  # "reboot": a new process would do the same
        assert st.boot().slot == 1
        assert st.commit()
    assert Flash(path, sector_size=4096).size == LAYOUT.total_size


def test_progress_percent() -> None:
    st = device()
    data = new_bundle()
    ctx = UpdaterContext(st, arch="esp32", total_size=len(data))
    assert ctx.progress_percent == 0
    ctx.process(data[: len(data) // 2])
    assert ctx.progress_percent == 50
    ctx.process(data[len(data) // 2 :])
    assert ctx.progress_percent == 100
    assert UpdaterContext(st, arch="esp32").progress_percent == 0
