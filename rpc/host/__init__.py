"""The host side of a device's services, split by concern, importing only :mod:`rpc`:

* :mod:`rpc.host.ota` — push a firmware bundle (``mos ota``), wait for the reboot, commit/revert;
* :mod:`rpc.host.window` — the OTA write window as a sans-I/O object (what to send, what a failure means);
* :mod:`rpc.host.files` — ``mos ls/get/put/rm`` over ``FS.*``;
* :mod:`rpc.host.config` — ``mos config-get/config-set`` over ``Config.*``.
"""

from rpc.host._common import DEFAULT_CHUNK_SIZE, OtaError, chunk_data

__all__ = ["DEFAULT_CHUNK_SIZE", "OtaError", "chunk_data"]
