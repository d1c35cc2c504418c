"""kvikio in this process: whether it imports, how to install it, which reader to build, and
its process-wide settings.

kvikio keeps one thread pool and one default task size per process. ``size_process_pool``
sizes the pool once per process, to ``PROCESS_POOL_THREADS``, and nothing else in tierflow
touches either: each ``KvikioReader`` carries its own parallelism and task size (see
``tierflow.tiers.io.kvikio``). Nothing here runs at import time; kvikio itself is imported
only when asked for.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import weakref
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
    ``requested`` is the profile's ``reader`` override (None means "auto")."""
    requested = requested or "auto"
    if requested not in READERS:
        raise ConfigError(f"reader must be one of {READERS}, got {requested!r}")
    if requested == "direct":
        return "direct"
    if requested == "auto":
        return "kvikio" if device_type == "cuda" and kvikio_available() else "direct"
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
        except ImportError:
            return None
    return found


def transfer_mode(kvikio: ModuleType) -> str:
    """"gds" where kvikio reads through GPUDirect Storage, else "compat" (POSIX reads and copies)."""
    defaults = _submodule(kvikio, "defaults")
    try:
        if hasattr(defaults, "is_compat_mode_preferred"):        # kvikio 25.04 and later
            return "compat" if defaults.is_compat_mode_preferred() else "gds"
        mode = defaults.compat_mode()                              # a CompatMode; a bool before 24.02
        mode = getattr(mode, "name", mode)
        if mode == "AUTO":                                         # GDS if the driver offers it
            driver = _submodule(kvikio, "cufile_driver")
            return "gds" if driver.DriverProperties().is_gds_available else "compat"
        return "gds" if mode in ("OFF", False) else "compat"
    except (AttributeError, RuntimeError, TypeError) as exc:     # only a statistic: report the slower mode
        log.debug("cannot tell whether kvikio uses GDS (%s)", exc)
        return "compat"


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
