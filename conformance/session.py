"""State shared by the checks of one run: the target URL, options, an open probe, learned facts."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from conformance.model import CheckFailed, CheckSkipped, ConformanceError
from conformance.probe import Probe, id_key
from rpc.auth import Credentials, make_auth
from rpc.errors import AuthError, MgrpcError
from rpc.frame import ABSENT, Frame

__all__ = ["AUTH_REQUIRED", "Options", "PreflightError", "Session"]

AUTH_REQUIRED = "the device requires authentication: pass --rpc-creds"
# A device that answers nothing at all is judged once, by the preflight, not by every check.
_SILENT = "the device does not answer RPC.List"


class PreflightError(ConformanceError, ConnectionError):
    """The run cannot start: the device demands credentials we do not have, or does not answer."""


log = logging.getLogger("mgrpc.conformance")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """How to run the device checks.

    ``timeout_s`` bounds each expected reply; ``quiet_s`` is how long to keep listening after a
    barrier before concluding that a frame got no reply; ``destructive`` allows OTA/reboot checks;
    ``ota_bundle`` is a fw.zip for the device (``ota_generate`` builds one for its ``arch``).
    ``check_timeout_s`` is each check's own deadline (default: 3 reply timeouts, so it scales with
    ``timeout_s`` on slow links); ``deadline_s`` bounds the whole run (None: no bound).
    ``max_frame_size`` is used only when the device does not report ``rpc.max_frame_size``.
    ``auth_method`` is a method the device's ACL asks a user for (the auth checks' target);
    ``denied_method`` one of its methods that no ACL entry matches (``auth.acl_denied``; None: skipped).
    ``ota_serve_host`` is the address the suite serves firmware on for the device to download (the
    pull checks; None: found from the device URL).
    """

    timeout_s: float = 5.0
    quiet_s: float = 0.3
    max_frame_size: int = 4096
    check_timeout_s: float | None = None
    deadline_s: float | None = None
    creds: Credentials | None = None
    auth_method: str = "Sys.GetInfo"
    denied_method: str | None = None
    destructive: bool = False
    ota_bundle: bytes | None = None
    ota_generate: bool = False
    ota_chunk_size: int = 512
    ota_serve_host: str | None = None
    reboot_timeout_s: float = 30.0
    device_id: str | None = None
    transport_opts: dict[str, Any] = field(default_factory=dict)

    @property
    def check_deadline_s(self) -> float:
        """One check's deadline (before its ``budget`` factor)."""
        return self.check_timeout_s if self.check_timeout_s is not None else max(3 * self.timeout_s, 3.0)


class Session:
    """One run against one device URL. Checks share the open :class:`Probe` and learned facts."""

    def __init__(self, url: str, options: Options | None = None) -> None:
        import transports

        self.url = url
        self.options = options or Options()
        self.parsed = transports.parse_url(url)
        self.scheme = self.parsed.scheme
        self._probe: Probe | None = None
        self._device_id: str | None = self.options.device_id
        self.facts: dict[str, Any] = {}
        self.sent_ids: set[Any] = set()  # every request id sent this run (late replies are recognised)
        self.offered: frozenset[str] | None = None  # RPC.List (lower-case), None if unknown
        self.last_sent: str = ""  # what the running check sent last (shown when it fails)
        self._extra_opts: dict[str, Any] = {}

    # -- the probe ----------------------------------------------------------------------------------
    async def probe(self) -> Probe:
        """The open probe (reopened if the device closed it, as non-persistent channels do)."""
        if self._probe is None or self._probe.closed:
            if self._probe is not None:
                await self._probe.close()
            opts = {**self.options.transport_opts, **self._extra_opts}
            if self.scheme == "serial":
                # A device that ignores mos's handshake must cost one reply timeout, not 15 s.
                opts.setdefault("handshake_timeout_s", self.options.timeout_s)
            if self.options.creds is not None and self._transport_wants_creds():
                opts.setdefault("creds", self.options.creds)  # HTTP digest is answered by the transport
            self._probe = await Probe.open(
                self.url, open_timeout_s=self.options.timeout_s * 2, sent_ids=self.sent_ids, **opts
            )
        return self._probe

    def _handshake_refused(self, e: Exception) -> bool:
        """True (and the handshake switched off) when a serial send failed for want of an answer to
        mos's handshake: frames alone are still judged; serial.handshake judges the handshake."""
        if self.scheme != "serial" or "handshake" not in str(e).lower() or self._extra_opts.get("handshake") == "off":
            return False
        log.info("the device does not answer the serial handshake; going on without it")
        self._extra_opts["handshake"] = "off"
        return True

    async def _probe_request(self, method: str, params: Any = ABSENT, **kw: Any) -> Frame | None:
        p = await self.probe()
        try:
            return await p.request(method, params, **kw)
        except MgrpcError as e:
            if not self._handshake_refused(e):
                raise
        return await (await self.reopen()).request(method, params, **kw)

    def note_sent(self, data: Any) -> None:
        """Record what a check sent on its own connection (shown if the check fails)."""
        from conformance.rawjson import show

        self.last_sent = show(data)

    def sent_text(self) -> str:
        """What the running check sent last (its own note, else the probe's last frame)."""
        if self.last_sent:
            return self.last_sent
        if self._probe is not None and self._probe.last_sent:
            from conformance.rawjson import show

            return show(self._probe.last_sent)
        return ""

    def begin_check(self) -> None:
        """Forget what the previous check sent."""
        self.last_sent = ""
        if self._probe is not None:
            self._probe.last_sent = b""

    def offers(self, method: str) -> bool:
        """True if the device lists ``method`` in ``RPC.List`` (or the list is unknown)."""
        return self.offered is None or method.lower() in self.offered

    def require(self, *methods: str) -> None:
        """Skip the running check unless the device offers every one of ``methods``."""
        missing = [m for m in methods if not self.offers(m)]
        if missing:
            raise CheckSkipped(f"not offered: {', '.join(missing)} is not in the device's RPC.List")

    # -- preflight ----------------------------------------------------------------------------------
    async def preflight(self) -> str:
        """Open the port and learn what the device offers (``RPC.List``); returns a short note.

        Raises :class:`PreflightError` when the device asks for credentials that were not given
        (a 401 challenge), or answers nothing at all; ``MgrpcError``/``OSError`` when the port
        cannot be opened.
        """
        if self.scheme == "serial":
            raw_resp = await self._raw_serial_rpc_list()
            if raw_resp is not None:
                return self._learn_list(raw_resp)
        try:
            resp = await self._probe_request("RPC.List", id=Probe.new_id(), timeout_s=self.options.timeout_s)
        except AuthError:  # HTTP: the transport saw 401 with no credentials to answer it
            raise PreflightError(AUTH_REQUIRED) from None
        except MgrpcError:
            resp = None
        if resp is None:
            if self.scheme == "serial":
                # Perhaps a device that ignores mos's handshake: go on without it (serial.handshake
                # judges that); frames alone must still be answered.
                log.info("no answer over serial; probing again without the handshake")
                self._extra_opts["handshake"] = "off"
            await self.reopen()
            resp = await (await self.probe()).request("RPC.List", timeout_s=self.options.timeout_s)
        if resp is None:
            raise PreflightError(f"{_SILENT} within {self.options.timeout_s:g} s (is {self.url} right?)")
        err = resp.error
        if err is not None and err.code == 401:
            if self.options.creds is None:
                raise PreflightError(AUTH_REQUIRED)
            resp = await self.request("RPC.List")
            err = resp.error
            if err is not None and err.code == 401:
                raise PreflightError("the device refused the credentials given with --rpc-creds")
        return self._learn_list(resp)

    def _learn_list(self, resp: Frame) -> str:
        if resp.error is None and isinstance(resp.result, list) and all(isinstance(m, str) for m in resp.result):
            self.offered = frozenset(m.lower() for m in resp.result)
            return f"{len(resp.result)} methods offered"
        return "RPC.List gave no method list; every check runs"

    async def _raw_serial_rpc_list(self) -> Frame | None:
        """``RPC.List`` over a serial port as a plain ``{json}\\n`` line, without CRC or triple quotes.

        The device's link modes are learned from the first frame that carries them and stay on
        until it reboots (transports.md §1.2), so the preflight must not switch them on before the
        serial checks run. None if the device gave no parseable answer (the probe is tried next).
        """
        from conformance.rawio import open_raw_serial
        from rpc.frame import parse_frame

        baud = int(self.parsed.option("baud") or self.parsed.option("baud_rate") or 115200)
        try:
            raw = await open_raw_serial(self.parsed.path, baud=baud)
        except (OSError, CheckSkipped):
            return None

        async def ask(frame: Frame) -> Frame | None:
            key = f'"id":{frame.id}'.encode()
            mark = len(raw.buffer)
            await raw.write(frame.encode("mos") + b"\n")

            def line(buf: bytes) -> bytes | None:
                k = buf.find(key, mark)
                if k < 0:
                    return None
                start = buf.rfind(b"{", 0, k + 1)
                end = buf.find(b"\n", k)
                if start < 0 or end < 0:
                    return None
                body = buf[start:end]
                return body[: body.rfind(b"}") + 1]

            if not await raw.wait_for(lambda b: line(b) is not None, timeout_s=self.options.timeout_s):
                return None
            text = line(bytes(raw.buffer))
            try:
                return parse_frame(text or b"")
            except (MgrpcError, ValueError):
                return None

        try:
            fid = Probe.new_id()
            resp = await ask(Frame(id=fid, src="mos", method="RPC.List"))
            if resp is None:
                return None
            err = resp.error
            if err is not None and err.code == 401:
                creds = self.options.creds
                if creds is None:
                    raise PreflightError(AUTH_REQUIRED)
                try:
                    challenge = json.loads(err.message or "")
                except ValueError:
                    return resp
                resp = await ask(Frame(id=fid, src="mos", method="RPC.List", auth=make_auth(challenge, creds)))
                if resp is not None and resp.error is not None and resp.error.code == 401:
                    raise PreflightError("the device refused the credentials given with --rpc-creds")
            return resp
        finally:
            await raw.close()

    async def recover(self) -> None:
        """After a check that may have upset the device: a fresh channel, and the device answering."""
        await self.wait_up(timeout_s=max(self.options.check_deadline_s, 2 * self.options.timeout_s))

    async def frame_limit(self) -> int:
        """``rpc.max_frame_size`` as the device reports it (``Config.Get``), else the option."""
        if "max_frame_size" not in self.facts:
            value = await self.config_value("rpc.max_frame_size")
            self.facts["max_frame_size"] = value if isinstance(value, int) and value > 0 else None
        got = self.facts["max_frame_size"]
        return int(got) if got else self.options.max_frame_size

    async def config_value(self, key: str) -> Any:
        """``Config.Get {key}`` of the device (None if it has no Config service or no such key)."""
        if not self.offers("Config.Get"):
            return None
        try:
            resp = await self.request("Config.Get", {"key": key})
        except CheckFailed:
            return None
        return None if resp.error is not None else resp.result

    def _transport_wants_creds(self) -> bool:
        from transports.registry import load

        return bool(getattr(load(self.scheme), "WANTS_CREDS", False))

    async def reopen(self) -> Probe:
        """Close and reopen the probe (after a reboot, or to start from a fresh channel)."""
        if self._probe is not None:
            await self._probe.close()
            self._probe = None
        return await self.probe()

    async def close(self) -> None:
        """Close the probe."""
        if self._probe is not None:
            await self._probe.close()
            self._probe = None

    # -- calls --------------------------------------------------------------------------------------
    async def request(self, method: str, params: Any = ABSENT, *, auto_auth: bool = True, **kw: Any) -> Frame:
        """Send a request and return its response; a missing response fails the check.

        With credentials, a 401 digest challenge is answered once with the same id, as mos does
        (``auto_auth=False`` returns the 401 itself).
        """
        kw.setdefault("timeout_s", self.options.timeout_s)
        fid = kw.pop("id", None)
        fid = Probe.new_id() if fid is None else fid
        try:
            resp = await self._probe_request(method, params, id=fid, **kw)
        except AuthError:  # HTTP: a 401 the transport had no credentials for
            raise CheckSkipped(f"{method} requires authentication: pass --rpc-creds") from None
        p = await self.probe()
        if resp is None:
            raise CheckFailed(
                f"no response to {method} within {kw['timeout_s']:g} s", seen="no response", expected="a response"
            )
        creds = self.options.creds
        err = resp.error
        if auto_auth and creds is not None and err is not None and err.code == 401 and "auth" not in kw:
            try:
                challenge = json.loads(err.message or "")
            except ValueError:
                return resp
            if isinstance(challenge, dict):
                timeout_s = kw.pop("timeout_s")
                again = Frame(id=fid, src=kw.pop("src", "mos"), method=method, params=params, **kw)
                retry = await self.auth_retry(p, again.replace(auth=make_auth(challenge, creds)), timeout_s)
                if retry is not None:
                    return retry
        if auto_auth and creds is None and err is not None and err.code == 401 and "auth" not in kw:
            # Not a conformance question: the device's ACL wants a user for this method.
            raise CheckSkipped(f"{method} requires authentication (401): pass --rpc-creds")
        return resp

    async def exchange(self, frame: Frame, *, timeout_s: float | None = None) -> Frame | None:
        """Send a hand-built request and return its response (None if none came in time); with
        credentials a 401 challenge is answered once with the same id, as mos does."""
        t = self.options.timeout_s if timeout_s is None else timeout_s
        p = await self.probe()
        try:
            resp = await p.exchange(frame, timeout_s=t)
        except MgrpcError as e:
            if not self._handshake_refused(e):
                raise
            p = await self.reopen()
            resp = await p.exchange(frame, timeout_s=t)
        creds = self.options.creds
        err = resp.error if resp is not None else None
        if creds is not None and err is not None and err.code == 401 and frame.auth is None:
            try:
                challenge = json.loads(err.message or "")
            except ValueError:
                return resp
            if isinstance(challenge, dict):
                retry = await self.auth_retry(p, frame.replace(auth=make_auth(challenge, creds)), t)
                if retry is not None:
                    return retry
        return resp

    async def auth_retry(self, p: Probe, frame: Frame, timeout_s: float) -> Frame | None:
        """Send the retry (same id, with ``auth``) and return its answer.

        A 401 that arrives first may be a duplicate of the first challenge (an MQTT broker delivers
        a request once per matching subscription, and the device answers each), so a 401 is only
        taken as the answer when no other reply with the id follows within a second.
        """
        key = id_key(frame.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            mark = await p.send(frame, timeout_s=timeout_s)
        except TimeoutError:
            return None
        got = await p.wait_for(
            lambda f: f.is_response and id_key(f.id) == key, start=mark, timeout_s=max(0.0, deadline - loop.time())
        )
        if got is None or got.error is None or got.error.code != 401:
            return got
        better = await p.wait_for(
            lambda f: f.is_response and id_key(f.id) == key and not (f.error is not None and f.error.code == 401),
            start=mark,
            timeout_s=min(1.0, max(0.0, deadline - loop.time())),
        )
        return better or got

    async def call(self, method: str, params: Any = ABSENT, **kw: Any) -> Any:
        """Call ``method`` and return its result; an error reply fails the check."""
        resp = await self.request(method, params, **kw)
        if resp.error is not None and resp.error.code != 0:
            raise CheckFailed(
                f"{method} answered with an error",
                seen=f"error {resp.error.code}: {resp.error.message}",
                expected="a result",
            )
        return None if resp.result is ABSENT else resp.result

    async def exchange_silent(self, frame: Frame) -> list[Frame]:
        """Send a frame that must get no reply; return every frame that arrived for it anyway.

        Sends ``frame``, then a barrier request (``RPC.Ping`` with a fresh id) and waits for the
        barrier's reply, then listens ``quiet_s`` longer. Frames other than the barrier's reply
        received in that window are returned (the caller decides which count as answers). A device
        may close a non-persistent channel instead of answering (frames.md §3); then the barrier goes
        on a new channel, and frames that came on the old one still count.
        """
        first = await self.probe()
        first_mark = len(first.frames)
        try:
            await first.send(frame, timeout_s=self.options.timeout_s)
        except TimeoutError:
            # The send itself got no answer in time (HTTP keeps the request open for a frame that
            # gets no reply): silence, which is what the caller checks. The channel is spent.
            log.info("no answer to the frame that must not be answered within %s s", self.options.timeout_s)
            await self.reopen()
        except (MgrpcError, OSError) as e:
            # The transport reports the device refused the frame (HTTP answers a dropped frame with
            # 400 "Invalid request"): no frame came back, which is what the caller checks.
            log.info("sending the frame that must not be answered failed: %s", e)
            await self.reopen()
        barrier_id = Probe.new_id()

        own = id_key(frame.id) if frame.id is not None else None

        def collected(p: Probe, mark: int) -> list[Frame]:
            got = list(first.frames[first_mark:])
            if p is not first:
                got += p.frames[mark:]
            # Late or repeated replies to earlier requests (ours, by id) are not answers to this frame.
            return [f for f in got if not (f.is_response and id_key(f.id) != own and id_key(f.id) in self.sent_ids)]

        p = await self.probe()  # a new one if the device closed the channel
        mark = first_mark if p is first else len(p.frames)
        reply: Frame | None = None
        send_failed = False
        try:
            await p.send(Frame(id=barrier_id, src="mos", method="RPC.Ping"), timeout_s=self.options.timeout_s)
        except (MgrpcError, TimeoutError):
            # The channel broke under the barrier (the device closed it for the frame, and the
            # close reached us as a failed write before the reader saw the end): it is gone.
            send_failed = True
        if not send_failed:
            reply = await p.wait_for(
                lambda f: f.is_response and id_key(f.id) == barrier_id, start=mark, timeout_s=self.options.timeout_s
            )
        if reply is None and (p.closed or send_failed):
            # Closed while we waited: make sure the device still answers on a new channel.
            again = await (await self.reopen()).request("RPC.Ping", timeout_s=self.options.timeout_s)
            if again is None:
                raise CheckFailed("device stopped answering", seen="no response to RPC.Ping", expected="a response")
            return collected(p, mark)
        if reply is None:
            raise CheckFailed("no response to the barrier RPC.Ping", seen="no response", expected="a response")
        await asyncio.sleep(self.options.quiet_s)
        return collected(p, mark)

    # -- learned facts ------------------------------------------------------------------------------
    async def device_id(self) -> str:
        """The device's id: ``--device-id``, else the ``src`` of its reply to ``RPC.Ping``."""
        if self._device_id:
            return self._device_id
        if self.scheme in ("mqtt", "mqtts") and self.parsed.path.strip("/"):
            self._device_id = self.parsed.path.strip("/")
            return self._device_id
        resp = await self.request("RPC.Ping")
        if not resp.src:
            raise CheckSkipped("the device does not say its id (no src in replies)")
        self._device_id = resp.src
        return resp.src

    async def get_info(self, *, fresh: bool = False) -> dict[str, Any]:
        """``Sys.GetInfo``'s result (cached unless ``fresh``)."""
        if fresh or "getinfo" not in self.facts:
            result = await self.call("Sys.GetInfo")
            if not isinstance(result, dict):
                raise CheckFailed("Sys.GetInfo result is not an object", seen=result, expected="an object")
            self.facts["getinfo"] = result
        info: dict[str, Any] = self.facts["getinfo"]
        return info

    async def wait_up(self, *, timeout_s: float | None = None) -> None:
        """After a reboot: reopen the probe until the device answers ``RPC.Ping`` again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None else self.options.reboot_timeout_s)
        last: Exception | None = None
        while loop.time() < deadline:
            try:
                await self.reopen()
                resp = await self._probe_request("RPC.Ping", timeout_s=min(2.0, max(0.1, deadline - loop.time())))
                if resp is not None:
                    return
            except (MgrpcError, OSError) as e:
                last = e
            await asyncio.sleep(0.2)
        raise CheckFailed(
            "device did not come back after the reboot",
            seen=f"no answer within the reboot timeout ({last or 'no reply'})",
            expected="RPC.Ping answered",
        )
