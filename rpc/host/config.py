"""Device configuration from the host: ``mos config-get`` and ``config-set`` over ``Config.*``,
and the value helpers they use (typed ``path=value`` changes, mos's value formatting)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from rpc.client import AsyncClient
from rpc.errors import UsageError
from rpc.host._common import MessageFn, OtaError, with_attempts

__all__ = [
    "OtaError",
    "apply_config_values",
    "config_get",
    "config_get_path",
    "config_set",
    "format_config_value",
    "parse_assignments",
]


async def config_get(client: AsyncClient, *, level: int = 0, attempts: int = 3, timeout_s: float | None = None) -> Any:
    """The whole device config: ``Config.Get`` (``{"level": n}`` when a level is asked for)."""
    params = {"level": level} if level > 0 else None

    async def get() -> Any:
        return await client.call("Config.Get", params, timeout_s=timeout_s)

    return await with_attempts("Config.Get", attempts, get)


def config_get_path(conf: Any, path: str) -> Any:
    """The value at dotted ``path`` (``""`` = all); :class:`OtaError` if there is none."""
    if not path:
        return conf
    node = conf
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise OtaError(f'no config value at path "{path}"')
        node = node[part]
    return node


def format_config_value(v: Any) -> str:
    """A config value as ``mos config-get`` prints it: strings raw, numbers plain, objects indented."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isfinite(v):
            text = format(Decimal(repr(v)), "f")  # Go's FormatFloat(v, 'f', -1): shortest, no exponent
            return text[:-2] if text.endswith(".0") else text
        return repr(v)
    from rpc.jsonfmt import go_indent

    # Go marshals a map with its keys sorted.
    return go_indent(json.dumps(v, ensure_ascii=False, sort_keys=True))


def _convert(path: str, old: Any, text: str) -> Any:
    if isinstance(old, bool):
        if text in ("true", "false"):
            return text == "true"
        raise OtaError(f'can\'t convert "{text}" to a boolean')
    if isinstance(old, int | float):
        try:
            f = float(text)
        except ValueError:
            raise OtaError(f'invalid number "{text}" for {path}') from None
        if isinstance(old, int) and f.is_integer() and "." not in text and "e" not in text.lower():
            return int(text)
        return f
    if isinstance(old, str):
        return text
    if isinstance(old, dict):
        raise OtaError(f'only strings, numbers and booleans can be set, but path "{path}" refers to an object')
    raise OtaError(f"unknown value type at {path}: {type(old).__name__}")


def apply_config_values(conf: Any, values: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Typed ``path=value`` changes against the current config; returns the nested diff to send.

    A value takes the type of the current one (mos): numbers parsed, booleans ``true``/``false``.
    """
    diff: dict[str, Any] = {}
    for path, text in values:
        parts = path.split(".")
        old = config_get_path(conf, path)
        new = _convert(path, old, text)
        node = diff
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = new
    return diff


def parse_assignments(args: Sequence[str]) -> list[tuple[str, str]]:
    """``k=v`` arguments as pairs; :class:`UsageError` for one without ``=``."""
    out = []
    for a in args:
        k, sep, v = a.partition("=")
        if not sep or not k:
            raise UsageError(f"invalid argument {a!r}: expected path.to.value=value")
        out.append((k, v))
    return out


async def config_set(
    client: AsyncClient,
    values: Sequence[tuple[str, str]],
    *,
    level: int = 0,
    save: bool = True,
    reboot: bool = True,
    try_once: bool = False,
    attempts: int = 3,
    timeout_s: float | None = None,
    on_message: MessageFn | None = None,
) -> dict[str, Any]:
    """``mos config-set``: read the config, apply typed changes, ``Config.Set`` the diff.

    Sends ``{"config": diff, "level"?, "save"?, "reboot"?, "try_once"?}`` (Go ``omitempty``: false
    and 0 left out). If the device did not save (older firmware answers no ``saved``), calls
    ``Config.Save {"reboot","try_once"}`` as mos does. Returns the diff sent.
    """

    def say(text: str) -> None:
        if on_message is not None:
            on_message(text)

    if not values:
        raise UsageError("at least one path.to.value=value pair should be given")
    say("Getting configuration...")
    conf = await config_get(client, level=level, attempts=attempts, timeout_s=timeout_s)
    diff = apply_config_values(conf, values)
    params: dict[str, Any] = {"config": diff}
    if level > 0:
        params["level"] = level
    if save:
        params["save"] = True
    if reboot:
        params["reboot"] = True
    if try_once:
        params["try_once"] = True
    say(f"Setting new configuration (level {level})..." if level > 0 else "Setting new configuration...")

    async def set_() -> Any:
        return await client.call("Config.Set", params, timeout_s=timeout_s)

    res = await with_attempts("Config.Set", attempts, set_)
    saved = isinstance(res, dict) and bool(res.get("saved"))
    if save and not saved:
        say("Saving and rebooting..." if reboot else "Saving...")

        async def save_() -> Any:
            return await client.call("Config.Save", {"reboot": reboot, "try_once": try_once}, timeout_s=10.0)

        await with_attempts("Config.Save", 3, save_)
    if save and try_once:
        say("Note: --try-once is set, config is valid for one reboot only")
    if save and reboot:
        await asyncio.sleep(0.2)  # as mos: let the reply leave before the device reboots
    return diff
