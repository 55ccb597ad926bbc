"""mgrpc, the application: the ``mgrpc`` command line, the wiring of the packages into running
things (:mod:`mgrpc.wiring`: virtual devices, bridges, the fleet), and the host/cloud apps (the fleet
dashboard :mod:`mgrpc.fleet`, the shadow service :mod:`mgrpc.shadow_server`).

This is the only composition root: it may import every other package and none imports it. The
libraries are ``rpc`` (frames, router, client), ``transports``, ``services`` (device services),
``updater`` (Layer 1) and ``conformance``.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.2.0"
