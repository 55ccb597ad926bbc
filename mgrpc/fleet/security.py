"""Who may use the dashboard, and protection against cross-site requests (sans-I/O).

:class:`Guard` decides on one request from its method, path, headers and cookies:

* **Credentials** (optional on 127.0.0.1, required on any other address, see :func:`require_credentials`):
  a bearer token (``Authorization: Bearer <token>``, or once as ``?token=`` on the page URL, which
  sets a session cookie) and/or an htdigest password file (``user:realm:HA1``, as ``htdigest``
  writes; the browser asks with HTTP Basic auth and the password is checked against the HA1).
  A session cookie is an HMAC over its expiry under a key derived from the credentials, so every
  dashboard process that shares them accepts it; it is ``HttpOnly``, ``SameSite=Strict`` and
  ``Secure`` under TLS.
* **Cross-site requests**: a state-changing request (anything but GET/HEAD/OPTIONS) is refused when
  the browser says it comes from another site (``Sec-Fetch-Site: cross-site|same-site``, or an
  ``Origin`` that is not this dashboard's). When it is authorised by something the browser sends
  on its own (the cookie, Basic auth) it must also carry ``X-CSRF-Token``: the token the page reads
  from ``/api/state``, which another site cannot read. Without credentials (loopback only) the
  ``Host`` must be a loopback name, so a DNS-rebound page cannot reach the API either.
* Open to all: ``/fw/<sha>.zip`` and ``/update`` (devices download from them and cannot log in),
  the static files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mgrpc.errors import AppError

__all__ = ["COOKIE", "CSRF_HEADER", "Decision", "Guard", "SecurityError", "is_loopback", "require_credentials"]

COOKIE = "mgrpc_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PREFIXES = ("/fw/", "/update", "/static/")
REALM = "mgrpc-dashboard"


class SecurityError(AppError, ValueError):
    """A configuration that would expose the dashboard unprotected, or an unreadable credentials file."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, maybe with a port) names this machine only."""
    h = host.strip()
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def require_credentials(listen_host: str, *, token: str | None, password_file: str | Path | None) -> None:
    """Refuse to serve on a non-loopback address without credentials (:class:`SecurityError`)."""
    if not is_loopback(listen_host) and not token and not password_file:
        raise SecurityError(
            f"the dashboard would listen on {listen_host}, reachable from other machines, without credentials: "
            "give --token-file or --password-file (or listen on 127.0.0.1)"
        )


@dataclass(frozen=True)
class Decision:
    """The verdict on one request: ``status`` 0 = go on; else refuse with it and ``reason``."""

    status: int = 0
    reason: str = ""
    user: str = ""
    set_cookie: str = ""  # a new session value to set (after a token or Basic login)
    challenge: bool = False  # 401 with WWW-Authenticate: Basic (a password file is configured)

    @property
    def ok(self) -> bool:
        """Whether the request may go on."""
        return self.status == 0


class Guard:
    """The dashboard's access rules (see the module docstring); ``token`` and ``password_file`` optional."""

    def __init__(self, *, token: str | None = None, password_file: str | Path | None = None,
                 secure_cookies: bool = False, clock: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.token = token or None
        self.password_file = Path(password_file) if password_file else None
        self.secure_cookies = secure_cookies
        self._clock = clock or time.time
        self._ha1: dict[tuple[str, str], str] = {}
        if self.password_file is not None:
            from rpc.auth import load_htdigest

            try:
                self._ha1 = load_htdigest(self.password_file)
            except OSError as e:
                msg = f"cannot read the password file {str(self.password_file)!r}: {e.strerror}"
                raise SecurityError(msg) from None
            if not self._ha1:
                raise SecurityError(f"the password file {str(self.password_file)!r} has no user:realm:HA1 line")
        material = (self.token or "") + "\0" + "\n".join(f"{u}:{r}:{h}" for (u, r), h in sorted(self._ha1.items()))
        # With credentials the key is derived from them (every dashboard process sharing them agrees);
        # without, a per-process random key (the CSRF token still must come from this dashboard's page).
        self._key = (hashlib.sha256(b"mgrpc-dashboard-session\0" + material.encode()).digest()
                     if self.required else secrets.token_bytes(32))  # fmt: skip

    @property
    def required(self) -> bool:
        """Whether credentials are configured (and so required)."""
        return bool(self.token or self._ha1)

    # -- sessions and CSRF tokens -----------------------------------------------------------------
    def new_session(self, user: str = "") -> str:
        """A session cookie value for ``user``: ``user.expiry.mac``."""
        user_b = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        exp = int(self._clock()) + SESSION_S
        body = f"{user_b}.{exp}"
        return f"{body}.{self._mac(body)}"

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]

    def session_user(self, value: str) -> str | None:
        """The user of a valid, unexpired session value, else None."""
        parts = value.split(".")
        if len(parts) != 3 or not hmac.compare_digest(self._mac(f"{parts[0]}.{parts[1]}"), parts[2]):
            return None
        try:
            if int(parts[1]) < self._clock():
                return None
            return base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)).decode()
        except ValueError:
            return None

    def csrf_token(self, session: str) -> str:
        """The CSRF token that goes with a session (or with ``""``: no session)."""
        return self._mac("csrf\0" + session)

    def cookie_header(self, value: str) -> str:
        """The ``Set-Cookie`` value for a session."""
        return (f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_S}"
                + ("; Secure" if self.secure_cookies else ""))  # fmt: skip

    # -- credentials ----------------------------------------------------------------------------
    def _check_basic(self, header: str) -> str | None:
        try:
            user, sep, password = base64.b64decode(header.split(" ", 1)[1].strip()).decode().partition(":")
        except (ValueError, IndexError):
            return None
        if not sep:
            return None
        from rpc.auth import digest_hash

        for (u, realm), ha1 in self._ha1.items():
            if u != user:
                continue
            algo = "SHA-256" if len(ha1) == 64 else "MD5"
            if hmac.compare_digest(digest_hash(algo, f"{user}:{realm}:{password}"), ha1):
                return user
        return None

    # -- the decision ---------------------------------------------------------------------------
    def check(
        self, method: str, path: str, headers: Mapping[str, str], cookies: Mapping[str, str],
        query: Mapping[str, str], *, own_origins: frozenset[str] = frozenset(),
    ) -> Decision:  # fmt: skip
        """Decide on one request (``headers`` case-insensitive, e.g. aiohttp's)."""
        if path.startswith(OPEN_PREFIXES):
            return Decision()
        state_changing = method.upper() not in SAFE_METHODS
        host = headers.get("Host", "")
        if not self.required and host and not is_loopback(host) and host not in {o.split("://", 1)[-1]
                                                                                 for o in own_origins}:
            return Decision(421, f"this dashboard answers to 127.0.0.1/localhost, not {host!r}")
        if state_changing:
            site = headers.get("Sec-Fetch-Site", "").lower()
            if site in ("cross-site", "same-site"):
                return Decision(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
            origin = headers.get("Origin")
            if origin and origin != "null" and origin not in own_origins and not _same_host(origin, host):
                return Decision(403, f"cross-site request refused (Origin: {origin})")
            if origin == "null":
                return Decision(403, "cross-site request refused (Origin: null)")
        # who is it?
        user: str | None = None
        ambient = False  # authorised by something a browser attaches on its own
        set_cookie = ""
        auth = headers.get("Authorization", "")
        session = cookies.get(COOKIE, "")
        if auth.lower().startswith("bearer ") and self.token:
            if hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
                user = "token"
            else:
                return Decision(401, "wrong token")
        elif auth.lower().startswith("basic ") and self._ha1:
            user = self._check_basic(auth)
            if user is None:
                return Decision(401, "wrong user or password", challenge=True)
            ambient = True
            if not session or self.session_user(session) is None:
                set_cookie = self.new_session(user)
        elif session and self.session_user(session) is not None:
            user = self.session_user(session)
            ambient = True
        elif self.token and query.get("token") and not state_changing:
            if hmac.compare_digest(query["token"].encode(), self.token.encode()):
                user, set_cookie = "token", self.new_session("token")
            else:
                return Decision(401, "wrong token")
        if self.required and user is None:
            return Decision(401, "log in: a bearer token (Authorization: Bearer ..., or ?token= once) "
                                 "or the user and password of the password file", challenge=bool(self._ha1))
        if state_changing and (ambient or not self.required):
            sess = set_cookie or (session if self.required else "")
            sent = headers.get(CSRF_HEADER, "")
            # A browser needs the page's token; programs without a browser's ambient credentials
            # (e.g. curl on 127.0.0.1) send neither an Origin nor the token.
            browser = ambient or sent or headers.get("Origin") or headers.get("Sec-Fetch-Site")
            if browser and (not sent or not hmac.compare_digest(sent, self.csrf_token(sess))):
                return Decision(403, f"missing or wrong {CSRF_HEADER} (reload the page)")
        return Decision(user=user or "", set_cookie=set_cookie)


def _same_host(origin: str, host: str) -> bool:
    return bool(host) and origin.split("://", 1)[-1] == host
