"""kvikio in this process: whether it imports, how to install it, which reader to build, and
its process-wide settings.

kvikio keeps one thread pool and one default task size per process. ``size_process_pool``
sizes the pool once per process, to ``PROCESS_POOL_THREADS``, and nothing else in tierflow
touches either: each ``KvikioReader`` carries its own parallelism and task size (see
``tierflow.tiers.io.kvikio``). Nothing here runs at import time; kvikio itself is imported
only when asked for.

Whether kvikio really uses GPUDirect Storage is verified, not assumed (``gds_status``): kvikio
falls back to its compatibility mode (POSIX reads through its own bounce buffers) where libcufile
does not load, and cuFile itself falls back to POSIX reads where the nvidia-fs kernel driver is
absent, as on most cloud GPUs; kvikio's own "compatibility mode preferred" flag is false in
that second case. So "gds" needs both: kvikio not in its compatibility mode, and cuFile's
driver properties naming a loaded nvidia-fs. A kvikio that cannot say counts as not verified.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from tierflow.errors import ConfigError
from tierflow.tiers.plan.hardware import READERS

log = logging.getLogger(__name__)


def _import_kvikio() -> tuple[ModuleType | None, str]:
    """The kvikio module, or None and why it cannot be imported."""
    try:
        return importlib.import_module("kvikio"), ""
    except ImportError as exc:
        return None, str(exc)
    except Exception as exc:  # a broken install fails while loading native code (OSError, RuntimeError, ...)
        return None, f"{type(exc).__name__}: {exc}"


def kvikio_available() -> bool:
    """Whether ``import kvikio`` succeeds. Never raises."""
    return _import_kvikio()[0] is not None


def _install_hint() -> str:
    cuda = torch.version.cuda
    if cuda is None:
        return ('this torch is a CPU build; install a CUDA build of torch, then pip install "tierflow[cuda12]" '
                'or "tierflow[cuda13]" to match its CUDA version')
    extra = f"cuda{cuda.split('.')[0]}"
    return f'install it with pip install "tierflow[{extra}]" (torch is built for CUDA {cuda})'


def require_kvikio() -> ModuleType:
    """The kvikio module, or a ``ConfigError`` saying how to install it."""
    kvikio, reason = _import_kvikio()
    if kvikio is None:
        raise ConfigError(f"reader='kvikio' needs the kvikio package, which cannot be imported ({reason}); "
                          f"{_install_hint()}, or set the reader to 'direct'")
    return kvikio


def choose_reader(requested: str | None, device_type: str) -> str:
    """The reader to build: "kvikio" (disk → GPU memory) or "direct" (O_DIRECT → pinned host → device).
    ``requested`` is the profile's ``reader`` override (None means "auto").

    "auto" takes kvikio only where GPUDirect Storage is verified (``gds_status``): in its
    compatibility mode kvikio reads through the page cache into its own bounce buffers, which
    fills RAM and misses the O_DIRECT bandwidth the plan was made with. An explicit "kvikio"
    is built in either mode (the reader warns when it is the compatibility mode)."""
    requested = requested or "auto"
    if requested not in READERS:
        raise ConfigError(f"reader must be one of {READERS}, got {requested!r}")
    if requested == "direct":
        return "direct"
    if requested == "auto":
        if device_type != "cuda":
            return "direct"
        status = kvikio_status()
        if status.mode != "gds":
            log.info("reader 'auto': O_DIRECT reads into pinned memory, then copies to the GPU (%s)", status.reason)
            return "direct"
        return "kvikio"
    if device_type != "cuda":
        raise ConfigError(f"reader='kvikio' reads into GPU memory, but the device is {device_type!r}; "
                          "set the reader to 'direct' or 'auto'")
    require_kvikio()
    return "kvikio"


def _submodule(kvikio: ModuleType, name: str) -> Any:
    """``kvikio.<name>``, imported if ``import kvikio`` did not; None where it does not exist."""
    found = getattr(kvikio, name, None)
    if found is None:
        try:
            found = importlib.import_module(f"{kvikio.__name__}.{name}")
        except (ImportError, OSError, RuntimeError):     # absent, or its native part does not load
            return None
    return found


@dataclass(frozen=True, slots=True)
class KvikioStatus:
    """How kvikio would read in this process."""
    mode: str                # "gds" (verified) | "compat" (kvikio's POSIX reads and bounce buffers) | "absent"
    reason: str              # why it is not "gds" ("" when it is)
    cufile_cache_bytes: int  # GPU memory cuFile may take for its bounce buffers ("gds" only; else 0)


def _compat_preferred(defaults: Any) -> bool | None:
    """Whether kvikio says it prefers its compatibility mode; None where this kvikio cannot say.

    ``defaults.is_compat_mode_preferred()`` (kvikio 25.04 and later) is true for
    ``KVIKIO_COMPAT_MODE=ON``, and for AUTO only when libcufile does not load: it is false
    wherever libcufile loads, GDS or not, so it is necessary, never sufficient. Before 25.04
    ``defaults.compat_mode()`` returns a ``CompatMode`` (a bool before 24.12)."""
    try:
        if hasattr(defaults, "is_compat_mode_preferred"):
            preferred = defaults.is_compat_mode_preferred()
            return preferred if isinstance(preferred, bool) else None
        if hasattr(defaults, "compat_mode"):
            mode = defaults.compat_mode()
            mode = getattr(mode, "name", mode)
            return {"ON": True, True: True, "OFF": False, "AUTO": False, False: False}.get(mode)
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        log.debug("cannot read kvikio's compatibility mode (%s)", exc)
    return None


def _driver_properties(driver: Any) -> Any:
    """cuFile's driver properties through kvikio: ``cufile_driver.properties`` (25.04 and later),
    else a ``cufile_driver.DriverProperties()`` (24.12 and 25.02); None where there are none."""
    props = getattr(driver, "properties", None)
    if props is None and callable(getattr(driver, "DriverProperties", None)):
        try:
            props = driver.DriverProperties()
        except (RuntimeError, OSError, TypeError) as exc:
            log.debug("cannot make kvikio's cuFile DriverProperties (%s)", exc)
    return props


def _driver_figure(props: Any, name: str) -> Any:
    """One of the driver's properties; reading it makes cuFile open its driver (and fail, where
    it cannot). None where it cannot be read."""
    try:
        return getattr(props, name, None)
    except (RuntimeError, OSError, TypeError) as exc:
        log.debug("cannot read cuFile's %s (%s)", name, exc)
        return None


CUFILE_CACHE_BYTES = 128 * 2**20    # cuFile's shipped max_device_cache_size_kb (131072): its GPU bounce buffers


def gds_status(kvikio: ModuleType) -> tuple[str, str, int]:
    """("gds" | "compat", why not "gds", GPU bytes of cuFile's bounce buffers) for this kvikio.

    "gds" only where both are verified: kvikio does not prefer its compatibility mode, and
    cuFile's driver properties say the nvidia-fs kernel driver is loaded
    (``DriverProperties.is_gds_available``: nvidia-fs's version is not 0.0; it reads the
    properties through ``cuFileDriverGetProperties``, so the driver opened). Anything that
    cannot be read (an older kvikio, a missing attribute) counts as not verified."""
    preferred = _compat_preferred(_submodule(kvikio, "defaults"))
    if preferred is None:
        return "compat", "this kvikio does not say whether it is in its compatibility mode", 0
    if preferred:
        return "compat", "kvikio is in its compatibility mode (KVIKIO_COMPAT_MODE=ON, or libcufile does not load)", 0
    driver = _submodule(kvikio, "cufile_driver")
    props = _driver_properties(driver) if driver is not None else None
    available = _driver_figure(props, "is_gds_available") if props is not None else None
    if not isinstance(available, bool):
        return "compat", "this kvikio cannot say whether cuFile's driver runs with nvidia-fs (GPUDirect Storage)", 0
    if not available:
        return "compat", ("cuFile's driver reports no nvidia-fs: GPUDirect Storage is not set up, so kvikio and "
                          "cuFile would read through POSIX bounce buffers"), 0
    cache_kib = _driver_figure(props, "max_device_cache_size")
    cache = cache_kib * 1024 if isinstance(cache_kib, int) and not isinstance(cache_kib, bool) and cache_kib >= 0 \
        else CUFILE_CACHE_BYTES
    return "gds", "", cache


def kvikio_status() -> KvikioStatus:
    """How kvikio would read here: imports kvikio (and, when it is not in its compatibility
    mode, asks cuFile's driver). Never raises."""
    kvikio, reason = _import_kvikio()
    if kvikio is None:
        return KvikioStatus("absent", f"kvikio cannot be imported ({reason})", 0)
    return KvikioStatus(*gds_status(kvikio))


def transfer_mode(kvikio: ModuleType) -> str:
    """"gds" where kvikio's reads are verified to go through GPUDirect Storage, else "compat"."""
    return gds_status(kvikio)[0]


PROCESS_POOL_THREADS = 32        # kvikio's process-wide pool, sized once: room for 8 engines at the default 4 threads

_pool_lock = threading.Lock()
_pool_sized: weakref.WeakSet[ModuleType] = weakref.WeakSet()   # the kvikio modules whose pool was sized


def _pool_threads(kvikio: ModuleType) -> int | None:
    """Threads of kvikio's process-wide pool now; None where this kvikio cannot say."""
    defaults = _submodule(kvikio, "defaults")
    try:
        if hasattr(defaults, "get"):                               # kvikio 25.04 and later
            return int(defaults.get("num_threads"))
        return int(defaults.get_num_threads())
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as exc:     # then assume it is small
        log.debug("cannot read the size of kvikio's thread pool (%s)", exc)
        return None


def _set_pool_threads(kvikio: ModuleType, threads: int) -> None:
    defaults = _submodule(kvikio, "defaults")
    if hasattr(defaults, "set"):                                   # kvikio 25.04 and later
        defaults.set("num_threads", threads)
    else:
        defaults.num_threads_reset(threads)


def size_process_pool(kvikio: ModuleType) -> int | None:
    """Size kvikio's process-wide thread pool to ``PROCESS_POOL_THREADS``, the first time this
    is called in the process (later calls change nothing), unless ``KVIKIO_NTHREADS`` is set or
    the pool is that large already. Returns the pool's size (None where kvikio cannot say)."""
    with _pool_lock:
        if kvikio not in _pool_sized:
            _pool_sized.add(kvikio)
            current = _pool_threads(kvikio)
            if "KVIKIO_NTHREADS" not in os.environ and (current is None or current < PROCESS_POOL_THREADS):
                _set_pool_threads(kvikio, PROCESS_POOL_THREADS)
        return _pool_threads(kvikio)
