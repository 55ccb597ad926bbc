"""rpc.host.files: mos ls/get/put over FS.* against the fake device (conftest.FakeOta)."""

from __future__ import annotations

import base64

from rpc.host.files import fs_get, fs_list, fs_put


async def test_fs_put_get_list_roundtrip(fake):
    client = await fake.connect()
    data = bytes(range(256)) * 5
    await fs_put(client, data, "blob.bin", chunk_size=500)
    assert fake.fs_params[0] == '{"filename":"blob.bin","offset":0,"append":false,"data":"' + base64.b64encode(data[:500]).decode() + '"}'
    assert len(fake.fs_params) == 3 and fake.files["blob.bin"] == data
    fake.fs_params.clear()
    got = await fs_get(client, "blob.bin", chunk_size=512)
    assert got == data
    assert fake.fs_params[0] == '{"filename":"blob.bin","len":512,"offset":0}' and len(fake.fs_params) == 3
    await fs_put(client, b"", "empty.txt")
    assert fake.files["empty.txt"] == b""
    assert [n for n, _ in await fs_list(client)] == ["blob.bin", "empty.txt"]
    await client.close()
