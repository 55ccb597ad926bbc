"""URL-option helpers shared by the aiohttp-based transports that cost nothing to import (no aiohttp):
the TLS context of a ``wss``/``https`` client and the codec named by ``?codec=``."""

from __future__ import annotations

import ssl

from rpc.channel import FrameCodec, JsonCodec
from rpc.codec import codec_by_name
from rpc.errors import UsageError
from transports.registry import TransportURL

__all__ = ["client_ssl_context", "codec_from_url", "insecure_option", "tls_failure_hint"]


def client_ssl_context(url: TransportURL) -> ssl.SSLContext:
    """TLS for wss/https clients: the server is verified against the system CAs, or ``?ca=FILE``;
    ``?insecure=1`` verifies nothing (what mos does without ``--ca-cert-file``). ``cert``/``key``
    give a client certificate."""
    ca, cert, key = url.option("ca"), url.option("cert"), url.option("key")
    insecure = insecure_option(url)
    if ca and insecure:
        raise UsageError("give either ca (verify the server with it) or insecure=1 (verify nothing), not both")
    try:
        if insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load TLS files: {e}") from None
    return ctx


def insecure_option(url: TransportURL) -> bool:
    """``?insecure=1`` (``0`` or absent: verify); anything else is a :class:`UsageError`."""
    text = url.option("insecure", "0") or "0"
    if text not in ("0", "1"):
        raise UsageError(f"invalid insecure {text!r}: must be 0 or 1")
    return text == "1"


def tls_failure_hint(e: BaseException) -> str:
    """``"; <what to do>"`` when ``e`` is a failed certificate verification, else ``""``."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return "; the server's certificate is not trusted: pass ?ca=FILE (its CA) or ?insecure=1 (verify nothing)"
        seen = seen.__cause__ or seen.__context__
    return ""


def codec_from_url(url: TransportURL) -> FrameCodec:
    """The codec named by ``?codec=`` (default ``json``); ``msgpack`` only between two mgrpc ends."""
    name = (url.option("codec") or "json").lower()
    if name == "json":
        return JsonCodec()
    return codec_by_name(name)
