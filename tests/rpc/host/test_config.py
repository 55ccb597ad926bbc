"""rpc.host.config: mos config-set over Config.* against the fake device, and the value helpers."""

from __future__ import annotations

import pytest

from rpc.host.config import OtaError, apply_config_values, config_set, format_config_value


async def test_config_set_sends_typed_diff(fake):
    client = await fake.connect()
    msgs: list[str] = []
    diff = await config_set(client, [("wifi.sta.enable", "true"), ("debug.level", "3")], reboot=False, on_message=msgs.append)
    await client.close()
    assert diff == {"wifi": {"sta": {"enable": True}}, "debug": {"level": 3}}
    assert fake.fs_params == ['{"config":{"wifi":{"sta":{"enable":true}},"debug":{"level":3}},"save":true}']
    assert msgs == ["Getting configuration...", "Setting new configuration..."]


def test_config_values_typing_and_errors():
    conf = {"a": {"b": 1, "s": "x", "f": 1.5, "t": True}}
    assert apply_config_values(conf, [("a.s", "42")]) == {"a": {"s": "42"}}
    assert apply_config_values(conf, [("a.f", "2")]) == {"a": {"f": 2.0}}
    with pytest.raises(OtaError, match=r'no config value at path "a\.zz"'):
        apply_config_values(conf, [("a.zz", "1")])
    with pytest.raises(OtaError, match="can't convert"):
        apply_config_values(conf, [("a.t", "yes")])
    with pytest.raises(OtaError, match="refers to an object"):
        apply_config_values(conf, [("a", "1")])
    assert format_config_value(True) == "true"
    assert format_config_value(1e21) == "1000000000000000000000"
    assert format_config_value(0.5) == "0.5"
    assert format_config_value({"b": 1, "a": "<"}) == '{\n  "a": "\\u003c",\n  "b": 1\n}'
