"""The probe's cache: ``<cache>/probe.json``, the figures measured on each machine.

``probe.probe`` decides what is measured and the keys its figures are kept under (machine,
filesystem, shape); this module only keeps them between runs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tierflow.tiers.io.cachedir import default_cache_dir

log = logging.getLogger(__name__)

_CACHE_VERSION = 3     # 3: disk figures carry the layout of the buffers they were read into


class ProbeCache:
    """``<cache>/probe.json``: figures per machine, keyed by what they depend on. A cache that
    cannot be written (a read-only ``TIERFLOW_CACHE_DIR``) is an optimisation lost, not an
    error: ``put`` warns once and the figures are measured again next time."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._warned = False

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):    # unreadable, not UTF-8, not JSON
            doc = None
        if isinstance(doc, dict) and doc.get("version") == _CACHE_VERSION and isinstance(doc.get("entries"), dict):
            return doc
        if not (isinstance(doc, dict) and isinstance(doc.get("version"), int) and doc["version"] < _CACHE_VERSION):
            log.warning("ignoring unreadable probe cache %s; it will be rewritten", self.path)
        return {}   # an older version's figures are simply measured again

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load().get("entries", {}).get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.path is None:
            return
        doc = self._load() or {"version": _CACHE_VERSION, "entries": {}}
        doc["entries"][key] = value
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass                     # never made: the directory takes no files
            if not self._warned:
                self._warned = True
                log.warning("cannot write the probe cache %s (%s): the figures are measured again next time; set "
                            "TIERFLOW_CACHE_DIR to a writable directory to keep them", self.path, exc.strerror or exc)


def default_cache() -> ProbeCache:
    return ProbeCache(default_cache_dir() / "probe.json")
