"""Deliberately broken devices: proof that the suite catches each kind of wrong device.

:class:`FaultyNode` is a device :class:`rpc.node.Node` that misbehaves in the ways named by
``faults`` — on the way in (how requests are read and routed), on the way out (how replies are
written, by wrapping each channel's ``encode``) or in its services. :data:`FAULTS` lists every fault
with the check that must fail because of it; the tests serve each broken device (``loop://`` or any
transport) and run the suite against it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from conformance.refdevice import FakeOta, make_node
from rpc.channel import Channel
from rpc.errors import HandlerError
from rpc.frame import ABSENT, ErrorInfo, Frame, RawJSON
from rpc.glob import is_glob
from rpc.node import Handler, Node

__all__ = ["FAULTS", "Fault", "FaultyNode", "make_faulty_node"]


@dataclass(frozen=True, slots=True)
class Fault:
    """A way to be wrong, and the check that must catch it."""

    name: str
    description: str
    caught_by: str
    transport: str = ""  # "" = any; "serial" = needs the serial framing device (conformance.serialdev)


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("id_as_string", "numeric ids echoed as strings", "frame.id_numeric_bare"),
        Fault("tag_dropped", "tag not copied into replies", "frame.tag_copied"),
        Fault("wrong_dst_answered", "requests for another dst answered", "frame.wrong_dst_dropped"),
        Fault("notification_answered", "requests without id answered", "frame.notification_silent"),
        Fault("args_ignored", "legacy args member ignored", "frame.args_accepted"),
        Fault("args_win", "args preferred over params", "frame.params_wins"),
        Fault("case_sensitive", "method names matched case-sensitively", "frame.method_case_insensitive"),
        Fault("not_found_message", "404 with a different message", "frame.not_found_404"),
        Fault("no_dst_in_reply", "reply dst not set to the request src", "frame.src_dst_swap"),
        Fault("mos_order", "replies written in mos member order", "frame.envelope_order"),
        Fault("getinfo_no_fw_version", "Sys.GetInfo without fw_version", "sys.getinfo"),
        Fault("rpc_list_spaced", "RPC.List printed with spaces", "rpc.list"),
        Fault("describe_not_found", "RPC.Describe answers 404 for known names", "rpc.describe"),
        Fault("ping_no_channel_info", "RPC.Ping without channel_info", "rpc.ping"),
        Fault("config_set_ignored", "Config.Set answers null but changes nothing", "config.set"),
        Fault("ota_gap_accepted", "OTA.Write accepts a gap", "ota.write_gap"),
        Fault("ota_duplicate_rejected", "OTA.Write rejects an exact repeat", "ota.write_duplicate"),
        Fault("ota_bad_bundle_accepted", "corrupt bundle installed", "ota.bad_bundle"),
        Fault("serial_crc_missing", "no CRC on serial replies after a CRC'd request", "serial.crc_reply", "serial"),
        Fault("serial_bad_crc_accepted", "frames with a bad CRC processed", "serial.bad_crc_dropped", "serial"),
        Fault("serial_no_handshake", "0x04 handshake not answered", "serial.handshake", "serial"),
    )
}


class FaultyNode(Node):
    """A device node with some :data:`FAULTS` switched on (see the module docstring)."""

    def __init__(self, *args: Any, faults: Iterable[str] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.faults = frozenset(faults)
        unknown = self.faults - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULTS)}")
        self._ota_end = 0  # where the next in-order OTA.Write starts, as seen on the wire

    # -- inbound ------------------------------------------------------------------------------------
    def frame_received(self, channel: Channel, frame: Frame) -> None:
        """Misread the request as the faults say, then route it normally."""
        f = self.faults
        if frame.is_request:
            if "wrong_dst_answered" in f and frame.dst and not self.is_local_id(frame.dst):
                frame = frame.replace(dst="")
            if "args_ignored" in f and frame.args is not ABSENT:
                frame = frame.replace(args=ABSENT)
            if "args_win" in f and frame.args is not ABSENT and frame.params is not ABSENT:
                frame = frame.replace(params=frame.args)
            if "notification_answered" in f and not frame.wants_reply:
                self.send_frame(Frame(src=self.id, dst=frame.src, result=None), channel=channel)
            if frame.method.lower() == "ota.begin":
                self._ota_end = 0
            is_write = frame.method.lower() == "ota.write" and isinstance(frame.arguments, dict)
            if is_write and self._ota_write_fault(channel, frame):
                return
        super().frame_received(channel, frame)

    def _ota_write_fault(self, channel: Channel, frame: Frame) -> bool:
        args = frame.arguments
        off = args.get("offset")
        data = args.get("data")
        if not isinstance(off, int) or not isinstance(data, str):
            return False
        n = len(data) * 3 // 4 - data[-2:].count("=")
        if "ota_gap_accepted" in self.faults and off > self._ota_end:
            self.send_frame(Frame(id=frame.id, src=self.id, dst=frame.src, tag=frame.tag, result=None), channel=channel)
            return True
        if "ota_duplicate_rejected" in self.faults and off < self._ota_end:
            err = ErrorInfo(-1, "duplicate write")
            self.send_frame(Frame(id=frame.id, src=self.id, dst=frame.src, tag=frame.tag, error=err), channel=channel)
            return True
        if off == self._ota_end:
            self._ota_end = off + n
        return False

    def find_handler(self, method: str) -> Handler | None:
        """With ``case_sensitive``, only an exact-case name reaches a plain (non-glob) handler."""
        h = super().find_handler(method)
        if h is not None and "case_sensitive" in self.faults and not is_glob(h.pattern) and h.pattern != method:
            return None
        return h

    # -- outbound -----------------------------------------------------------------------------------
    def add_channel(self, channel: Channel, *, default: bool = False, address: str | None = None) -> Channel:
        """Attach ``channel`` with its encoder wrapped to write replies wrongly."""
        orig = channel.encode

        def encode(frame: Frame) -> bytes:
            frame = self._mutate(frame)
            if "mos_order" in self.faults and frame.is_response:
                return channel.codec.encode(frame, "mos")
            return orig(frame)

        channel.encode = encode  # type: ignore[method-assign]
        return super().add_channel(channel, default=default, address=address)

    def _mutate(self, frame: Frame) -> Frame:
        f = self.faults
        if frame.is_request:
            return frame
        if "id_as_string" in f and isinstance(frame.id, int):
            frame = frame.replace(id=str(frame.id))
        if "tag_dropped" in f and frame.tag:
            frame = frame.replace(tag="")
        if "no_dst_in_reply" in f and frame.dst:
            frame = frame.replace(dst="")
        err = frame.error
        if (
            "not_found_message" in f
            and err is not None
            and err.code == 404
            and (err.message or "").startswith("No handler")
        ):
            frame = frame.replace(error=ErrorInfo(404, "Method not found"))
        res = frame.result
        if res is not ABSENT and res is not None:
            obj = json.loads(res) if isinstance(res, RawJSON) else res
            if "getinfo_no_fw_version" in f and isinstance(obj, dict) and "fw_version" in obj and "arch" in obj:
                obj = {k: v for k, v in obj.items() if k != "fw_version"}
                frame = frame.replace(result=RawJSON(json.dumps(obj)))
            if "rpc_list_spaced" in f and isinstance(obj, list) and "RPC.List" in obj:
                frame = frame.replace(result=RawJSON(json.dumps(obj)))
        return frame


def make_faulty_node(faults: Iterable[str], *, ota: FakeOta | None = None, device_id: str | None = None) -> FaultyNode:
    """The reference device (:func:`conformance.refdevice.make_node`) with ``faults`` switched on."""
    fset = frozenset(faults)
    kw: dict[str, Any] = {} if device_id is None else {"device_id": device_id}

    class _Node(FaultyNode):
        def __init__(self, id: str | None = None, **k: Any) -> None:
            super().__init__(id, faults=fset, **k)

    node = make_node(ota=ota, node_cls=_Node, **kw)
    assert isinstance(node, FaultyNode)
    if "describe_not_found" in fset:

        def describe(ctx: Any, params: Any) -> Any:
            raise HandlerError(404, "name not found")

        node.add_handler("RPC.Describe", describe, args_fmt="{name: %T}")
    if "config_set_ignored" in fset:
        node.add_handler("Config.Set", lambda ctx, p: None)
    if "ping_no_channel_info" in fset:
        node.add_handler("RPC.Ping", lambda ctx, p: {"info": ctx.channel.info()})
    if "ota_bad_bundle_accepted" in fset:
        ota_state: FakeOta = node.ota  # type: ignore[attr-defined]
        real_end = ota_state.end

        def lax_end() -> bool:
            try:
                return real_end()
            except HandlerError:
                if ota_state.state == 2:  # pretend the corrupt bundle was installed
                    new = 1 - ota_state.running_slot
                    ota_state.slots[new] = type(ota_state.slots[0])("corrupt", "corrupt")
                    ota_state.revert_slot, ota_state.active = ota_state.running_slot, new
                    ota_state.committed = False
                    ota_state.state = 3
                    return True
                raise

        ota_state.end = lax_end  # type: ignore[method-assign]
    return node
