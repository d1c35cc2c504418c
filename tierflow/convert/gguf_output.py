"""The output directory of a GGUF conversion: atomic, idempotent, never another's.

``tierflow.convert.gguf`` decides what a conversion writes; this module owns where it lands and
when an existing directory may be reused or replaced (locks, renames, markers, orphans).

* **Atomic, idempotent output.** Everything is written into a hidden temporary sibling
  of ``out_dir`` that is renamed into place at the end; on any failure it is removed. The
  converting process holds that directory's lock (``tiers/io/cachedir.claim``) until then, so
  one left by a process that was killed is an orphan the next conversion into the same place
  removes (:func:`remove_orphaned_outputs`), while a live conversion's is left alone.
  The last file written is a marker (:data:`MARKER_FILENAME`) recording the source
  path, size, mtime and dtype; a later call with the same source and dtype returns at
  once. A stale tierflow conversion (the GGUF changed, or another dtype) is replaced;
  a directory that tierflow did not write is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tierflow.errors import CheckpointError
from tierflow.tiers.io.cachedir import claim, remove_orphans

__all__ = ["CONFIG_FILENAME", "MARKER_FILENAME", "WEIGHTS_FILENAME", "check_out_dir_replaceable",
           "is_complete_conversion", "make_parent_dir", "new_staging_dir", "publish", "remove_orphaned_outputs"]

logger = logging.getLogger(__name__)

MARKER_FILENAME = "tierflow-conversion.json"
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete_conversion(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    marker = _read_marker(out_dir)
    if marker is None or any(marker.get(key) != value for key, value in fingerprint.items()):
        return False
    return (out_dir / WEIGHTS_FILENAME).is_file() and (out_dir / CONFIG_FILENAME).is_file()


def check_out_dir_replaceable(out_dir: Path) -> None:
    """``out_dir`` may be replaced only if it is absent, empty or an earlier tierflow conversion."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another output directory")
    if _read_marker(out_dir) is not None or not any(out_dir.iterdir()):
        return
    raise CheckpointError(
        f"{out_dir} already exists and is not a tierflow conversion (no {MARKER_FILENAME}); "
        "remove it or choose another output directory"
    )


def make_parent_dir(out_dir: Path) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the output directory's parent {out_dir.parent}: {error}") from error


def remove_orphaned_outputs(out_dir: Path) -> list[Path]:
    """Remove the hidden siblings of ``out_dir`` that killed conversions left: partial outputs
    whose writer is gone (their lock is free) and stale conversions being replaced. Returns them."""
    out_dir = Path(out_dir).expanduser().absolute()
    removed = [*remove_orphans(out_dir.parent, f".{out_dir.name}.partial-*"),
               *remove_orphans(out_dir.parent, f".{out_dir.name}.stale-*")]
    if removed:
        logger.info("removed %d unfinished conversion(s) of %s left by processes that ended: %s",
                    len(removed), out_dir, ", ".join(path.name for path in removed))
    return removed


def new_staging_dir(out_dir: Path) -> tuple[Path, int]:
    """A new hidden sibling to convert into, and the descriptor that holds its lock."""
    for _ in range(100):
        staging_dir = _new_sibling_dir(out_dir, "partial")
        try:
            fd = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise CheckpointError(f"cannot open the temporary directory {staging_dir}: {error}") from error
        try:
            if claim(fd, staging_dir):
                return staging_dir, fd
        except OSError as error:
            shutil.rmtree(staging_dir, ignore_errors=True)
            os.close(fd)
            raise CheckpointError(f"cannot lock the temporary directory {staging_dir}: {error}") from error
        os.close(fd)                     # taken for an orphan in the instant before the lock: another
    raise CheckpointError(f"cannot make a temporary directory in {out_dir.parent} that stays there")


def _new_sibling_dir(out_dir: Path, purpose: str) -> Path:
    sibling = out_dir.parent / f".{out_dir.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        sibling.mkdir()
    except OSError as error:
        raise CheckpointError(f"cannot create a temporary directory in {out_dir.parent}: {error}") from error
    return sibling


def publish(staging_dir: Path, out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Move the finished ``staging_dir`` to ``out_dir``, replacing a stale conversion."""
    stale_dir: Path | None = None
    if out_dir.exists():
        if is_complete_conversion(out_dir, fingerprint):  # a concurrent conversion won the race
            shutil.rmtree(staging_dir, ignore_errors=True)
            return
        check_out_dir_replaceable(out_dir)
        stale_dir = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out_dir.rename(stale_dir)
    try:
        staging_dir.rename(out_dir)
    except OSError as error:
        if is_complete_conversion(out_dir, fingerprint):
            shutil.rmtree(staging_dir, ignore_errors=True)
            return
        raise CheckpointError(f"cannot move the finished conversion into {out_dir}: {error}") from error
    finally:
        if stale_dir is not None:
            shutil.rmtree(stale_dir, ignore_errors=True)
