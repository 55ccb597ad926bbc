"""Device services (Sys.*, Config.*, FS.*, OTA.*, shadow, polling) and the virtual device.

``VirtualDevice`` (in :mod:`services.device`) puts them together on an emulated flash; an embedder
can instead register any of them on its own :class:`rpc.node.Node` with the ``add_*_service``
functions and a :class:`services.firmware.Firmware` describing its platform.
"""

from services.config import DeviceConfig, add_config_service
from services.errors import ServiceError
from services.firmware import DeviceFS, Firmware, MemoryFS
from services.fs import add_fs_service
from services.ota import OtaService, add_ota_service
from services.sys import add_sys_service

__all__ = [
    "DeviceConfig",
    "DeviceFS",
    "Firmware",
    "MemoryFS",
    "OtaService",
    "ServiceError",
    "add_config_service",
    "add_fs_service",
    "add_ota_service",
    "add_sys_service",
]
