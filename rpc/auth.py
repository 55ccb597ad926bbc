"""Frame-level digest authentication and ACLs (spec/frame.md §6).

Device side: :class:`Authenticator` checks the ``auth`` object of a request against an htdigest
password file and decides, with the :class:`Acl`, whether the request may run. Client side:
:func:`make_auth` builds the ``auth`` object ``mos --rpc-creds`` sends after a 401.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpc.errors import AuthError, UsageError
from rpc.glob import glob_match

__all__ = [
    "Acl",
    "AclEntry",
    "AuthDecision",
    "Authenticator",
    "Credentials",
    "challenge_message",
    "digest_hash",
    "htdigest_line",
    "http_challenge_header",
    "http_digest_authorization",
    "http_digest_response",
    "load_htdigest",
    "make_auth",
    "parse_creds",
    "parse_digest_header",
    "verify_http_digest",
]

ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
NONCE_MAX_AGE_S = 3600
NONCE_AHEAD_MAX_S = 60  # how far unique nonces may run ahead of the clock
USED_NONCES_MAX = 65536  # digest answers remembered against replay (older ones: their nonces expire)


def digest_hash(algorithm: str, text: str) -> str:
    """Lowercase hex of H(text) with ``MD5`` or ``SHA-256``."""
    try:
        h = ALGORITHMS[algorithm.upper()]
    except KeyError:
        raise AuthError(f"unsupported digest algorithm {algorithm!r}") from None
    return h(text.encode("utf-8")).hexdigest()


def _response(algorithm: str, ha1: str, nonce: Any, cnonce: Any) -> str:
    ha2 = digest_hash(algorithm, "dummy_method:dummy_uri")
    return digest_hash(algorithm, f"{ha1}:{nonce}:1:{cnonce}:auth:{ha2}")


# -- client side -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password for digest authentication."""

    user: str
    password: str


def parse_creds(spec: str) -> Credentials:
    """Parse ``user:pass`` or ``@file`` (file holding ``user:pass``, trimmed) as ``--rpc-creds`` does."""
    if spec.startswith("@"):
        try:
            spec = Path(spec[1:]).read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read credentials file {spec[1:]!r}: {e.strerror}") from None
    user, sep, password = spec.partition(":")
    if not sep or not user:
        raise UsageError("credentials must be user:pass or @file")
    return Credentials(user, password)


def make_auth(challenge: Mapping[str, Any], creds: Credentials, *, cnonce: int | None = None) -> dict[str, Any]:
    """The ``auth`` object mos sends in reply to a 401 challenge (member order as mos writes it)."""
    realm = str(challenge.get("realm", ""))
    algorithm = str(challenge.get("algorithm", "") or "")
    nonce = challenge.get("nonce", 0)
    if cnonce is None:
        cnonce = random.randrange(0, 2**32 - 1)
    ha1 = digest_hash(algorithm or "MD5", f"{creds.user}:{realm}:{creds.password}")
    auth: dict[str, Any] = {
        "realm": realm,
        "username": creds.user,
        "nonce": nonce,
        "cnonce": cnonce,
    }
    if algorithm:
        auth["algorithm"] = algorithm
    auth["response"] = _response(algorithm or "MD5", ha1, nonce, cnonce)
    if challenge.get("opaque"):
        auth["opaque"] = challenge["opaque"]
    return auth


# -- device side -------------------------------------------------------------------------------


def load_htdigest(path: str | Path) -> dict[tuple[str, str], str]:
    """Read an htdigest file (``user:realm:HA1hex`` per line) into ``{(user, realm): ha1}``."""
    entries: dict[tuple[str, str], str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            continue
        entries[(parts[0], parts[1])] = parts[2].lower()
    return entries


def htdigest_line(user: str, realm: str, password: str, *, algorithm: str = "MD5") -> str:
    """One htdigest line for ``user`` (what ``htdigest`` writes, or its SHA-256 variant)."""
    return f"{user}:{realm}:{digest_hash(algorithm, f'{user}:{realm}:{password}')}"


def challenge_message(realm: str, algorithm: str, nonce: int) -> str:
    """The 401 message text: a JSON document in device spacing, as ``mos`` parses it."""
    return (
        f'{{"auth_type": "digest", "nonce": {nonce}, "nc": 1, "realm": {json.dumps(realm)}, '
        f'"algorithm": {json.dumps(algorithm)}}}'
    )


@dataclass(frozen=True, slots=True)
class AclEntry:
    """One ACL entry: method glob, optional channel type, and the ``acl`` spec."""

    method: str
    acl: str
    ch_type: str | None = None

    def allows(self, user: str | None) -> bool | None:
        """True/False for allow/deny; None when a user is needed but none is authenticated."""
        spec = self.acl.strip()
        if spec in ("*", "+*"):
            return True
        if spec == "-*":
            return False
        # mgos_conf_check_access: comma-separated entries, '+user' allows, '-user' denies.
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            allow = not item.startswith("-")
            name = item.lstrip("+-")
            if name == "*":
                return allow
            if user is not None and name == user:
                return allow
        return None if user is None else False


class Acl:
    """An ordered list of :class:`AclEntry`; the first entry whose method (and ch_type) matches decides."""

    def __init__(self, entries: Iterable[AclEntry]) -> None:
        self.entries = list(entries)

    @classmethod
    def parse(cls, text: str) -> Acl:
        """Parse the ``rpc.acl`` JSON text, or ``@file``."""
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UsageError(f"invalid ACL JSON: {e}") from None
        if not isinstance(items, list):
            raise UsageError("the ACL must be a JSON array of objects")
        entries = []
        for it in items:
            if not isinstance(it, dict) or "method" not in it or "acl" not in it:
                raise UsageError('each ACL entry needs "method" and "acl"')
            entries.append(AclEntry(str(it["method"]), str(it["acl"]), it.get("ch_type")))
        return cls(entries)

    def find(self, method: str, ch_type: str) -> AclEntry | None:
        """The deciding entry for ``method`` on a channel of type ``ch_type``."""
        for e in self.entries:
            if e.ch_type and e.ch_type != ch_type:
                continue
            if glob_match(e.method, method):
                return e
        return None


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """Outcome of the pre-handler check: allowed (with the user), or an error code and message."""

    allowed: bool
    user: str | None = None
    code: int = 0
    message: str = ""


class Authenticator:
    """Checks ``auth`` objects and ACLs the way rpc-common's pre-handler does.

    ``password_file`` is htdigest; ``algorithm`` ``MD5`` or ``SHA-256``; ``clock`` returns unix time
    (injectable for tests of nonce freshness).
    """

    def __init__(
        self,
        *,
        password_file: str | Path | None = None,
        users: Mapping[str, str] | None = None,
        realm: str = "RPC",
        algorithm: str = "MD5",
        acl: Acl | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if algorithm.upper() not in ALGORITHMS:
            raise UsageError("algorithm must be MD5 or SHA-256")
        self.password_file = Path(password_file) if password_file else None
        self.realm = realm
        self.algorithm = "SHA-256" if algorithm.upper() == "SHA-256" else "MD5"
        self.acl = acl
        self.clock = clock
        self._ha1: dict[tuple[str, str], str] = {}
        self._last_nonce = 0
        self._used: OrderedDict[Hashable, int] = OrderedDict()
        self._used_floor = 0
        for user, password in (users or {}).items():
            self._ha1[(user, realm)] = digest_hash(self.algorithm, f"{user}:{realm}:{password}")

    def nonce(self) -> int:
        """A fresh nonce: the current unix time, as a device issues it -- but never the same twice
        (a second challenge within a second gets the next number), so that every digest answer is
        for a nonce of its own and a replayed one can be told apart (:meth:`first_use`)."""
        now = int(self.clock())
        # ... at most NONCE_AHEAD_MAX_S ahead of the clock: a flood of requests without credentials
        # must not push the nonces (and with them the staleness check) far into the future. Past that
        # a number may repeat; a replayed answer is still refused (first_use), a legitimate second
        # answer to a repeated nonce needs one more challenge.
        n = min(max(now, self._last_nonce + 1), now + NONCE_AHEAD_MAX_S)
        self._last_nonce = max(self._last_nonce, n)
        return n

    def fresh(self, nonce: int) -> bool:
        """Whether ``nonce`` is neither stale (over :data:`NONCE_MAX_AGE_S` old, or below the floor
        left by forgotten answers) nor from the future (beyond what this authenticator issued)."""
        now = self.clock()
        return self._used_floor < nonce <= max(now, self._last_nonce) and now - nonce < NONCE_MAX_AGE_S

    def first_use(self, key: Hashable, nonce: int) -> bool:
        """Record a verified digest answer; False when the same one was seen before (a replay).

        ``key`` identifies the answer (user, nonce, cnonce, nc, ...). At most
        :data:`USED_NONCES_MAX` are kept: expired ones are dropped, and when the table is full the
        oldest goes and every nonce up to its one counts as stale from then on.
        """
        if key in self._used:
            return False
        horizon = self.clock() - NONCE_MAX_AGE_S
        while self._used and next(iter(self._used.values())) <= horizon:
            self._used.popitem(last=False)
        while len(self._used) >= USED_NONCES_MAX:
            _, old = self._used.popitem(last=False)
            self._used_floor = max(self._used_floor, old)
        self._used[key] = nonce
        return True

    def challenge(self) -> tuple[int, str]:
        """The 401 error (code, message) asking for digest credentials."""
        return 401, challenge_message(self.realm, self.algorithm, self.nonce())

    def _table(self) -> dict[tuple[str, str], str] | None:
        if self.password_file is None:
            return self._ha1
        try:
            table = load_htdigest(self.password_file)
        except OSError:
            return None
        table.update(self._ha1)
        return table

    def verify(self, auth: Mapping[str, Any]) -> tuple[str | None, AuthDecision | None]:
        """Check an ``auth`` object: (user or None when not authenticated, error decision or None)."""
        try:
            realm = auth["realm"]
            user = auth["username"]
            nonce = auth["nonce"]
            cnonce = auth["cnonce"]
            response = auth["response"]
        except (KeyError, TypeError):
            return None, AuthDecision(False, code=400, message="bad request")
        algorithm = str(auth.get("algorithm") or "MD5")
        if realm != self.realm or algorithm.upper() != self.algorithm.upper():
            return None, None
        try:
            nonce_i = int(nonce)
        except (TypeError, ValueError, OverflowError):  # OverflowError: "nonce": Infinity
            return None, AuthDecision(False, code=400, message="bad request")
        if not self.fresh(nonce_i):
            return None, None  # stale nonce: silently not authenticated
        table = self._table()
        if table is None:
            return None, AuthDecision(False, code=500, message="failed to open password file")
        ha1 = table.get((str(user), self.realm))
        if ha1 is None:
            return None, None
        if _response(self.algorithm, ha1, nonce_i, cnonce) != str(response).lower():
            return None, None
        if not self.first_use(("frame", str(user), nonce_i, str(cnonce)), nonce_i):
            return None, None  # a replayed answer: not authenticated (the reply is a fresh challenge)
        return str(user), None

    def check(self, method: str, ch_type: str, auth: Mapping[str, Any] | None, user: str | None) -> AuthDecision:
        """Decide a request: authenticate ``auth`` (if any), then apply the ACL."""
        if auth is not None:
            verified, err = self.verify(auth)
            if err is not None:
                return err
            if verified is not None:
                user = verified
        if self.acl is None:
            return AuthDecision(True, user)
        entry = self.acl.find(method, ch_type)
        if entry is None:
            return AuthDecision(False, user, 403, "unauthorized")
        verdict = entry.allows(user)
        if verdict is True:
            return AuthDecision(True, user)
        if verdict is None:
            code, msg = self.challenge()
            return AuthDecision(False, None, code, msg)
        return AuthDecision(False, user, 403, "unauthorized")


# -- HTTP digest (RFC 2617, qop=auth): the device's 401 and mos's HTTP codec (spec/transports.md §3) --


def http_challenge_header(realm: str, algorithm: str, nonce: int) -> str:
    """The ``WWW-Authenticate`` value a device sends with HTTP 401 (nonce = unix time in lowercase hex)."""
    return f'Digest qop="auth", realm="{realm}", nonce="{nonce:x}", algorithm={algorithm}'


def parse_digest_header(value: str) -> dict[str, str] | None:
    """Parse ``Digest k=v, k="v", ...`` (``WWW-Authenticate`` or ``Authorization``); None if not Digest.

    Keys are lowercased; quoted values are unquoted (backslash escapes honoured).
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            buf = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(rest[i])
                i += 1
            i += 1  # closing quote
            params[key] = "".join(buf)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return params


def http_digest_response(
    algorithm: str, ha1: str, nonce: str, nc: str, cnonce: str, qop: str, method: str, uri: str
) -> str:
    """RFC 2617 ``response`` = H(HA1:nonce:nc:cnonce:qop:H(method:uri)) in lowercase hex."""
    ha2 = digest_hash(algorithm, f"{method}:{uri}")
    return digest_hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def http_digest_authorization(
    challenge: Mapping[str, str], creds: Credentials, *, method: str = "POST", uri: str = "/rpc", cnonce: str = "12345"
) -> str:
    """The ``Authorization`` value mos's HTTP codec sends after a 401 (member order and fixed cnonce as mos)."""
    realm = challenge.get("realm", "")
    nonce = challenge.get("nonce", "")
    algorithm = challenge.get("algorithm") or "MD5"
    ha1 = digest_hash(algorithm, f"{creds.user}:{realm}:{creds.password}")
    nc = "00000001"
    response = http_digest_response(algorithm, ha1, nonce, nc, cnonce, "auth", method, uri)
    value = (
        f'Digest username="{creds.user}", realm="{realm}", uri="{uri}", algorithm={algorithm}, '
        f'nonce="{nonce}", nc={nc}, cnonce="{cnonce}", qop=auth, response="{response}"'
    )
    if challenge.get("opaque"):
        value += f', opaque="{challenge["opaque"]}"'
    return value


def verify_http_digest(authenticator: Authenticator, header: str, method: str) -> str | None:
    """Check an HTTP ``Authorization: Digest`` header against ``authenticator``'s password table.

    Returns the user name, or None when the header is missing, malformed, for another realm or
    algorithm, carries a stale nonce (hex unix time older than an hour or in the future), names an
    unknown user, has a wrong response, or was accepted before (a replay: nonce, cnonce and nc
    already used). ``method`` is the request's HTTP method.
    """
    p = parse_digest_header(header) if header else None
    if p is None:
        return None
    try:
        user, realm, nonce, uri, response = p["username"], p["realm"], p["nonce"], p["uri"], p["response"]
    except KeyError:
        return None
    algorithm = p.get("algorithm") or "MD5"
    if realm != authenticator.realm or algorithm.upper() != authenticator.algorithm.upper():
        return None
    try:
        nonce_t = int(nonce, 16)
    except ValueError:
        return None
    if not authenticator.fresh(nonce_t):
        return None
    table = authenticator._table()
    ha1 = table.get((user, realm)) if table is not None else None
    if ha1 is None:
        return None
    qop = p.get("qop", "")
    if qop:
        expected = http_digest_response(
            authenticator.algorithm, ha1, nonce, p.get("nc", ""), p.get("cnonce", ""), qop, method, uri
        )
    else:  # RFC 2069 form, no qop
        ha2 = digest_hash(authenticator.algorithm, f"{method}:{uri}")
        expected = digest_hash(authenticator.algorithm, f"{ha1}:{nonce}:{ha2}")
    if expected != response.lower():
        return None
    key = ("http", user, nonce, p.get("cnonce", ""), p.get("nc", ""), qop)
    return user if authenticator.first_use(key, nonce_t) else None  # a replayed header: refused
