"""The named faults: each bends one statement of the protocol reference and names the check that must
catch it. ``transport`` is where the fault shows (the device serves it there in the self-tests);
``only`` are the checks to run (default: just ``check``); ``destructive`` marks faults whose check
changes the device (OTA, Config.Set, FS writes). ``check`` is ``preflight`` for a fault that leaves no
request answered at all (the run's preflight then stops it with one FAIL), and ``connect`` for one
that makes the port impossible to open (one ERROR: "cannot open ...").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAULTS", "Fault"]


@dataclass(frozen=True, slots=True)
class Fault:
    """One way to be wrong: the statement broken (``section``, ``rule``) and the check that catches it."""

    name: str
    check: str
    transport: str
    section: str
    rule: str
    only: tuple[str, ...] = ()
    destructive: bool = False

    @property
    def checks(self) -> tuple[str, ...]:
        """The checks to run against this fault."""
        return self.only or (self.check,)


_F = Fault
_UPD = ("ota.update",)

FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        # -- frames.md ---------------------------------------------------------------------------------
        _F("id_quoted", "frame.id_numeric_bare", "ws", "frames.md §1.2", "an all-digit id is written bare"),
        _F("string_id_bare", "frame.id_string", "ws", "frames.md §1.2, §9", "a string id is echoed as a string"),
        _F(
            "negative_id_bare",
            "frame.id_non_digits_quoted",
            "ws",
            "frames.md §1.2",
            "an id that is not all digits is quoted",
        ),
        _F("wrong_id_echo", "preflight", "tcp", "frames.md §1", "responses copy the request id"),
        _F("member_order", "frame.envelope_order", "ws", "frames.md §1.2", "envelope order id, src, dst, tag, payload"),
        _F(
            "envelope_spaces",
            "frame.envelope_order",
            "serial",
            "frames.md §1.2",
            "no whitespace between envelope members",
        ),
        _F("tag_dropped", "frame.tag_copied", "http", "frames.md §1", "tag copied verbatim into the response"),
        _F("dst_not_set", "frame.src_dst_swap", "ws", "frames.md §1.2, §8", "response dst = request src"),
        _F(
            "src_ignores_dst", "frame.src_is_dst", "tcp", "frames.md §1.2", "response src = the request's non-empty dst"
        ),
        _F("wrong_dst_answered", "frame.wrong_dst_dropped", "ws", "frames.md §3", "a frame for another dst is dropped"),
        _F(
            "notification_answered",
            "frame.notification_silent",
            "ws",
            "frames.md §1",
            "a request without id gets no response",
        ),
        _F(
            "http_notification_answered",
            "frame.notification_silent",
            "http",
            "frames.md §1; transports.md §3.1",
            "no reply over HTTP for a frame without id",
        ),
        _F("args_ignored", "frame.args_accepted", "serial", "frames.md §1", "args is read like params"),
        _F("args_win", "frame.params_wins", "ws", "frames.md §1", "with both, params wins"),
        _F(
            "case_sensitive",
            "frame.method_case_insensitive",
            "ws",
            "frames.md §3",
            "method matching is case-insensitive",
        ),
        _F(
            "not_found_code",
            "frame.not_found_404",
            "ws",
            "frames.md §3, §5",
            "unknown method: code 404 (no -32xxx codes)",
        ),
        _F(
            "not_found_message",
            "frame.not_found_404",
            "mqtt",
            "frames.md §3, §5",
            "unknown method: message No handler for <M>",
        ),
        _F(
            "error_with_result",
            "frame.not_found_404",
            "ws",
            "frames.md §1, §1.2",
            "an error response carries no result",
        ),
        _F(
            "unknown_member_rejected",
            "frame.unknown_members_ignored",
            "ws",
            "frames.md §1.1",
            "unknown members are ignored",
        ),
        _F("v_rejected", "frame.unknown_members_ignored", "tcp", "frames.md §1", "v is parsed and ignored"),
        _F(
            "oversize_crash",
            "frame.max_frame_size",
            "ws",
            "frames.md §2; transports.md §1.2 (6)",
            "an oversize frame is dropped and the device survives",
        ),
        _F(
            "limit_too_small",
            "frame.max_frame_size",
            "ws",
            "transports.md §1.2 (6)",
            "frames up to rpc.max_frame_size are processed",
        ),
        _F(
            "serial_oversize_accepted",
            "frame.max_frame_size",
            "serial",
            "transports.md §1.2 (6)",
            "serial input beyond the limit is discarded",
        ),
        _F("response_answered", "frame.response_ignored", "ws", "frames.md §1", "an unsolicited response is ignored"),
        # -- built-in services (frames.md §4) ----------------------------------------------------------
        _F("rpc_list_spaced", "rpc.list", "ws", "frames.md §4", "RPC.List prints no spaces"),
        _F("rpc_list_no_ping", "rpc.list", "http", "frames.md §4", "RPC.List lists every registered method"),
        _F("describe_order", "rpc.describe", "ws", "frames.md §4", "RPC.Describe: {name, args_fmt}"),
        _F("describe_missing_404", "rpc.describe", "serial", "frames.md §4", "missing name: 400 name is required"),
        _F("describe_unknown_400", "rpc.describe", "ws", "frames.md §4", "unknown name: 404 name not found"),
        _F("ping_no_channel_info", "rpc.ping", "mqtt", "frames.md §4", "RPC.Ping: {channel_info}"),
        _F("ping_info_wrong", "rpc.ping_channel_info", "serial", "frames.md §4; transports.md §1.2", "UART<n>"),
        _F("getinfo_no_fw_version", "sys.getinfo", "ws", "frames.md §4", "Sys.GetInfo has fw_version"),
        _F("getinfo_order", "sys.getinfo", "http", "frames.md §4", "Sys.GetInfo keys in the documented order"),
        _F("getinfo_uptime_string", "sys.getinfo", "ws", "frames.md §4", "Sys.GetInfo uptime is an integer"),
        _F("getinfo_wrong_id", "sys.getinfo", "tcp", "frames.md §4", "Sys.GetInfo id is the device id"),
        _F(
            "reboot_negative_accepted",
            "sys.reboot_bad_delay",
            "ws",
            "frames.md §4",
            "delay_ms < 0: 400 invalid delay value",
        ),
        # -- Config (tool.md §6, real-device.md) ---------------------------------------------------------
        _F("config_get_key_ignored", "config.get", "ws", "tool.md §6", "Config.Get {key} returns that value"),
        _F("config_set_ignored", "config.set", "ws", "tool.md §6", "Config.Set changes the value", destructive=True),
        _F(
            "config_unknown_key_null",
            "config.get_unknown_key",
            "serial",
            "real-device.md RD-E13",
            "Config.Get of an unknown key is an error",
        ),
        # -- FS (tool.md §6) -----------------------------------------------------------------------------
        _F("fs_list_objects", "fs.list", "ws", "tool.md §6", "FS.List returns an array of file names"),
        _F(
            "fs_required_500",
            "fs.get_errors",
            "http",
            "tool.md §6; real-device.md RD-E13",
            "FS.Get without filename: 400 filename is required",
        ),
        _F(
            "fs_get_missing_ok",
            "fs.get_errors",
            "ws",
            "tool.md §6; real-device.md RD-E13",
            "FS.Get of a missing file is an error",
        ),
        _F(
            "fs_get_left_wrong",
            "fs.put_get_remove",
            "ws",
            "tool.md §6",
            "FS.Get returns {data, left}",
            destructive=True,
        ),
        _F(
            "fs_get_offset_ignored",
            "fs.put_get_remove",
            "serial",
            "tool.md §6",
            "FS.Get honours offset and len",
            destructive=True,
        ),
        _F(
            "fs_put_append_ignored",
            "fs.put_get_remove",
            "ws",
            "tool.md §6",
            "FS.Put append adds to the file",
            destructive=True,
        ),
        _F("fs_remove_noop", "fs.put_get_remove", "tcp", "tool.md §6", "FS.Remove removes the file", destructive=True),
        # -- OTA (ota.md §1) -----------------------------------------------------------------------------
        _F("ota_status_state_string", "ota.status", "ws", "ota.md §1.1", "OTA.Status state is an integer"),
        _F("ota_status_state_out_of_range", "ota.status", "mqtt", "ota.md §1.1", "OTA.Status state is 0..3"),
        _F(
            "ota_status_idle_while_updating",
            "ota.write_duplicate",
            "ws",
            "ota.md §1.1, §2",
            "state is 1 (progress) during an update",
            destructive=True,
        ),
        _F("bootstate_committed_int", "ota.boot_state", "ws", "ota.md §1.9", "is_committed is a boolean"),
        _F("bootstate_no_revert_slot", "ota.boot_state", "serial", "ota.md §1.9", "GetBootState has revert_slot"),
        _F(
            "ota_gap_accepted",
            "ota.write_gap",
            "ws",
            "ota.md §1.3",
            "a write past the received data is an error",
            destructive=True,
        ),
        _F(
            "ota_duplicate_rejected",
            "ota.write_duplicate",
            "http",
            "ota.md §1.3",
            "an exact repeat of a chunk is accepted",
            destructive=True,
        ),
        _F(
            "ota_end_early_ok",
            "ota.abort",
            "ws",
            "ota.md §1.4",
            "End before all data aborts with an error",
            destructive=True,
        ),
        _F(
            "ota_abort_stays_progress",
            "ota.abort",
            "tcp",
            "ota.md §1.4",
            "after an abort the device returns to idle",
            destructive=True,
        ),
        _F(
            "ota_bad_bundle_accepted",
            "ota.bad_bundle",
            "ws",
            "ota.md §1.4; updater.md §1",
            "a corrupt bundle is rejected",
            destructive=True,
        ),
        _F(
            "ota_begin_uncommitted_ok",
            "ota.begin_uncommitted",
            "ws",
            "ota.md §1.2",
            "Begin refused while uncommitted",
            (*_UPD, "ota.begin_uncommitted"),
            True,
        ),
        _F(
            "ota_begin_while_busy_ok",
            "ota.begin_busy",
            "ws",
            "ota.md §1.2",
            "Begin refused while an update runs",
            destructive=True,
        ),
        _F("ota_commit_twice_ok", "ota.commit", "ws", "ota.md §1.6", "Commit when committed is -1", destructive=True),
        _F(
            "ota_commit_noop",
            "ota.commit",
            "http",
            "ota.md §1.6",
            "Commit commits the running firmware",
            destructive=True,
        ),
        _F("ota_revert_noop", "ota.revert", "ws", "ota.md §1.7", "Revert boots the previous slot", destructive=True),
        _F(
            "ota_revert_committed_ok",
            "ota.revert",
            "serial",
            "ota.md §1.7",
            "Revert when committed is -1",
            destructive=True,
        ),
        _F(
            "ota_update_committed",
            "ota.update",
            "ws",
            "ota.md §1.4; tool.md §4",
            "a fresh update boots uncommitted",
            destructive=True,
        ),
        _F(
            "ota_update_same_slot",
            "ota.update",
            "ws",
            "ota.md §1.4; updater.md §6",
            "the update boots the other slot",
            destructive=True,
        ),
        _F(
            "ota_update_wrong_revert_slot",
            "ota.update",
            "mqtt",
            "ota.md §1.9",
            "revert_slot is the previous slot",
            destructive=True,
        ),
        _F(
            "ota_update_stale_version",
            "ota.update",
            "ws",
            "ota.md §1.4",
            "the new firmware's version runs",
            destructive=True,
        ),
        _F(
            "ota_no_reboot",
            "ota.update",
            "ws",
            "ota.md §1.4",
            "OTA.End success reboots into the new slot",
            destructive=True,
        ),
        _F(
            "ota_set_boot_state_empty_ok",
            "ota.set_boot_state",
            "ws",
            "ota.md §1.10",
            "no recognised field: -2",
            destructive=True,
        ),
        _F(
            "ota_set_boot_state_ignored",
            "ota.set_boot_state",
            "http",
            "ota.md §1.10",
            "given fields are stored",
            destructive=True,
        ),
        _F(
            "ota_snapshot_wrong_slot",
            "ota.create_snapshot",
            "ws",
            "ota.md §1.8",
            "the snapshot goes to the inactive slot",
            destructive=True,
        ),
        _F(
            "ota_snapshot_revert_ignored",
            "ota.create_snapshot",
            "ws",
            "ota.md §1.8",
            "set_as_revert makes the firmware uncommitted",
            destructive=True,
        ),
        _F("ota_status_committed_int", "ota.status_fields", "ws", "ota.md §1.1", "Status is_committed is a bool"),
        _F("ota_update_malformed_ok", "ota.update_malformed", "http", "ota.md §1.5", "no url: -1 Malformed request"),
        _F(
            "bundle_manifest_not_first_ok",
            "ota.bundle_rules",
            "ws",
            "updater.md §1.3",
            "manifest.json comes first",
            destructive=True,
        ),
        _F(
            "bundle_wrong_platform_ok",
            "ota.bundle_rules",
            "http",
            "updater.md §2.1",
            "the platform must match",
            destructive=True,
        ),
        _F(
            "bundle_missing_version_ok",
            "ota.bundle_rules",
            "tcp",
            "updater.md §2.1",
            "version is required",
            destructive=True,
        ),
        _F("bundle_deflated_ok", "ota.bundle_rules", "ws", "updater.md §1.2", "stored entries only", destructive=True),
        _F("http_update_commit_ok", "ota.http_commit", "http", "ota.md §3", "/update/commit when committed: 400"),
        # -- serial (transports.md §1) -----------------------------------------------------------------
        _F(
            "serial_no_handshake",
            "serial.handshake",
            "serial",
            "transports.md §1.2 (4), §1.4",
            '0x04 is answered with """\\x04"""',
        ),
        _F(
            "serial_handshake_bare",
            "serial.handshake",
            "serial",
            "transports.md §1.2 (4)",
            "the handshake reply is quoted",
        ),
        _F(
            "serial_crc_missing",
            "serial.crc_reply",
            "serial",
            "transports.md §1.1",
            "crc mode is learned from a verified CRC",
        ),
        _F(
            "serial_crc_wrong",
            "serial.crc_reply",
            "serial",
            "transports.md §1.1",
            "the reply CRC is the CRC-32 of its JSON",
        ),
        _F(
            "serial_bad_crc_accepted",
            "serial.bad_crc_dropped",
            "serial",
            "transports.md §1.2 (5)",
            "a CRC mismatch drops the frame",
        ),
        _F(
            "serial_crc_required", "serial.crc_optional", "serial", "transports.md §1.1", "a frame without CRC is valid"
        ),
        _F(
            "serial_compat_not_learned",
            "serial.mos_style",
            "serial",
            "transports.md §1.1",
            'compat mode is learned from """',
        ),
        _F(
            "serial_mixed_delimiters",
            "serial.mos_style",
            "serial",
            "transports.md §1.1",
            'compat replies open and close with """',
        ),
        _F(
            "serial_junk_not_skipped",
            "serial.junk_tolerance",
            "serial",
            "transports.md §1.2 (5)",
            "bytes before the first { are dropped",
        ),
        _F(
            "serial_non_ascii_accepted",
            "serial.non_ascii_dropped",
            "serial",
            "transports.md §1.2 (1)",
            "a byte >= 0x80 discards the buffer",
        ),
        # -- tcp (transports.md §7) ----------------------------------------------------------------------
        _F("tcp_quoted_always", "tcp.line_style", "tcp", "transports.md §7", "a fresh connection gets newline framing"),
        _F("tcp_crc_added", "tcp.mos_style", "tcp", "transports.md §7", "no CRC on TCP"),
        _F("tcp_compat_not_learned", "tcp.mos_style", "tcp", "transports.md §7", '""" input gets """ replies'),
        _F("tcp_junk_closes", "tcp.line_style", "tcp", "transports.md §7, §1.6", "junk lines are skipped"),
        # -- ws (transports.md §2) -----------------------------------------------------------------------
        _F("ws_subprotocol_wrong", "connect", "ws", "transports.md §2", "the subprotocol is echoed verbatim"),
        _F(
            "ws_ping_ignored",
            "ws.ping_pong",
            "ws",
            "transports.md §2",
            "a PING is answered with a PONG",
        ),
        _F("ws_close_ignored", "ws.close_handshake", "ws", "transports.md §2", "a CLOSE is answered"),
        _F("ws_binary_replies", "ws.text_frames", "ws", "transports.md §2", "replies are TEXT messages"),
        _F(
            "ws_newline_appended",
            "ws.text_frames",
            "ws",
            "transports.md §2",
            "the message is exactly the JSON, no newline",
        ),
        _F(
            "ws_binary_ignored",
            "ws.binary_accepted",
            "ws",
            "transports.md §2",
            "inbound messages of any type are parsed",
        ),
        # -- http (transports.md §3) ---------------------------------------------------------------------
        _F(
            "http_error_status",
            "http.full_frame_error",
            "http",
            "transports.md §3.1",
            "full-frame mode always answers 200",
        ),
        _F("http_content_type_text", "http.full_frame", "http", "transports.md §3.1", "Content-Type: application/json"),
        _F("http_no_cors", "http.full_frame", "http", "transports.md §3.1", "the CORS headers are sent"),
        _F("http_no_crlf", "http.full_frame", "http", "transports.md §3.1", "the body ends with \\r\\n"),
        _F(
            "http_rest_whole_frame",
            "http.rest_result",
            "http",
            "transports.md §3.2",
            "the REST body is the bare result",
        ),
        _F("http_rest_get_refused", "http.rest_result", "http", "transports.md §3.2", "GET /rpc/<Method> works"),
        _F(
            "http_rest_status_200",
            "http.rest_status",
            "http",
            "transports.md §3.2; frames.md §5",
            "REST 404 error is HTTP 404",
        ),
        _F(
            "http_rest_status_404_all",
            "http.rest_status",
            "http",
            "transports.md §3.2; frames.md §5",
            "other REST errors are HTTP 500",
        ),
        _F("http_options_405", "http.options_cors", "http", "transports.md §3.2", "OPTIONS is a 200 CORS preflight"),
        _F(
            "http_wrong_dst_answered",
            "http.wrong_dst",
            "http",
            "transports.md §3.5; frames.md §3",
            "wrong dst: 400 Invalid request",
        ),
        _F("http_rest_string_quoted", "http.rest_string_result", "http", "transports.md §3.2", "bare REST strings"),
        _F("http_options_rpc_200", "http.options_rpc", "http", "transports.md §3.5", "OPTIONS /rpc is a 400"),
        _F("ws_invalid_json_closes", "ws.invalid_json_ignored", "ws", "transports.md §2.5", "invalid JSON is ignored"),
        _F("http_keepalive_always", "http.keep_alive", "http", "transports.md §3.1", "keep-alive only when asked"),
        _F("http_rest_query_ignored", "http.rest_get_query", "http", "transports.md §3.2", "GET query args are used"),
        # -- mqtt (transports.md §4) ---------------------------------------------------------------------
        _F("mqtt_reply_topic_wrong", "preflight", "mqtt", "transports.md §4", "replies go to <request src>/rpc"),
        _F(
            "mqtt_src_dst_not_swapped",
            "mqtt.topics",
            "mqtt",
            "transports.md §4; frames.md §1.2",
            "reply src = device, dst = request src",
        ),
        _F(
            "mqtt_wrong_dst_answered",
            "mqtt.wrong_dst_dropped",
            "mqtt",
            "frames.md §3; transports.md §4",
            "wrong dst dropped",
        ),
        _F(
            "mqtt_method_topic_ignored",
            "mqtt.method_topic",
            "mqtt",
            "transports.md §4",
            "<id>/rpc/<Method> sets the method",
        ),
    )
}
