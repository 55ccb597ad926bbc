"""URL-option helpers shared by the aiohttp-based transports that cost nothing to import (no aiohttp):
the TLS context of a ``wss``/``https`` client and the codec named by ``?codec=``."""

from __future__ import annotations

import ssl

from rpc.channel import FrameCodec, JsonCodec
from rpc.codec import codec_by_name
from rpc.errors import UsageError
from transports.registry import TransportURL

__all__ = ["client_ssl_context", "codec_from_url"]


def client_ssl_context(url: TransportURL) -> ssl.SSLContext:
    """TLS for wss/https clients: verify only when ``?ca=`` is given (as mos), client cert if ``cert``."""
    ca, cert, key = url.option("ca"), url.option("cert"), url.option("key")
    try:
        if ca:
            ctx = ssl.create_default_context(cafile=ca)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load TLS files: {e}") from None
    return ctx


def codec_from_url(url: TransportURL) -> FrameCodec:
    """The codec named by ``?codec=`` (default ``json``); ``msgpack`` only between two mgrpc ends."""
    name = (url.option("codec") or "json").lower()
    if name == "json":
        return JsonCodec()
    return codec_by_name(name)
