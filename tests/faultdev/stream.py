"""Serial and TCP stream framing of the device (docs/protocol/transports.md §1.1-§1.2, §7), sans-I/O.

:class:`StreamLink` is one channel's receive buffer and learned modes: :meth:`feed` takes bytes and
returns the frames' JSON bytes to hand to the device plus whatever must be written back at once (the
handshake reply); :meth:`frame_out` frames one reply for the wire.
"""

from __future__ import annotations

from tests.faultdev import wire

__all__ = ["StreamLink"]

Q3 = b'"""'


class StreamLink:
    """One stream channel: receive algorithm and the sticky compat/CRC modes."""

    def __init__(self, fault: str | None, *, kind: str, max_frame_size: int = 4096) -> None:
        self.fault = fault
        self.kind = kind  # serial or tcp
        self.max_frame_size = max_frame_size
        self.buf = bytearray()
        self.compat = fault == "tcp_quoted_always"
        self.crc = fault == "tcp_crc_added"
        self.pending_nl = b""  # \n replies to empty frames, sent with the next transmission
        self.close_now = False

    def has(self, name: str) -> bool:
        return self.fault == name

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Frames (JSON bytes) for the device, and bytes to write back now."""
        if any(b >= 0x80 for b in data) and not self.has("serial_non_ascii_accepted"):
            self.buf.clear()  # §1.2 (1): non-ASCII input discards the whole buffer
            return [], b""
        self.buf += data
        frames: list[bytes] = []
        out = b""
        while True:
            q = self.buf.find(Q3)
            n = self.buf.find(b"\n")
            if q >= 0:
                # the \"\"\" delimiter is looked for first, anywhere in the buffer (§1.2 (2))
                end, dlen = q, 3
                if not self.has("serial_compat_not_learned") and not self.has("tcp_compat_not_learned"):
                    self.compat = True
            elif n >= 0:
                end, dlen = n, 1
            else:
                break
            body = bytes(self.buf[:end])
            del self.buf[: end + dlen]
            if not body.strip():
                self.pending_nl += b"\n"
                continue
            if body == b"\x04":
                if self.has("serial_no_handshake"):
                    continue
                reply = b"\x04\n" if self.has("serial_handshake_bare") else b'"""\x04"""'
                out += self.pending_nl + reply
                self.pending_nl = b""
                continue
            k = body.find(b"{")
            if k < 0:
                if self.has("tcp_junk_closes"):
                    self.close_now = True  # the fault: junk ends the connection, the rest is lost
                    self.buf.clear()
                    return frames, out
                continue
            if k > 0 and self.has("serial_junk_not_skipped"):
                continue
            body = body[k:]
            j = body.rfind(b"}")
            if j < 0:
                continue
            js, meta = body[: j + 1], body[j + 1 :]
            if len(meta) >= 8:
                try:
                    got = int(meta[:8], 16)
                except ValueError:
                    got = -1
                if got != int(wire.crc_hex(js), 16) and not self.has("serial_bad_crc_accepted"):
                    continue  # "Corrupted frame"
                if not self.has("serial_crc_missing"):
                    self.crc = True
            elif self.has("serial_crc_required"):
                continue
            frames.append(js)
        limit = self.max_frame_size + 6
        if len(self.buf) > limit and not self.has("serial_oversize_accepted"):
            self.buf.clear()  # §1.2 (6): "Incoming frame is too big"
        return frames, out

    def frame_out(self, json_text: str) -> bytes:
        """One reply framed as the device writes it (§1.1)."""
        js = json_text.encode("utf-8")
        crc = b""
        if self.crc:
            c = wire.crc_hex(js)
            if self.has("serial_crc_wrong"):
                c = f"{int(c, 16) ^ 1:08x}"
            crc = c.encode()
        if self.compat and self.has("serial_mixed_delimiters"):
            data = b"\n" + js + crc + Q3 + b"\n"
        elif self.compat:
            data = b"\n" + Q3 + js + crc + Q3 + b"\n"
        else:
            data = b"\n" + js + crc + b"\n"
        data = self.pending_nl + data
        self.pending_nl = b""
        return data
