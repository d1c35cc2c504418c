"""The directories and files an EngineConfig names, checked before an open reads or allocates
anything: ``trace_path`` must name a file in a directory that takes new files, and
``kv_cache_dir`` / ``prefix_cache_dir`` must be directories this process can create files in
(or whose last component it can create). A bad path is a ConfigError naming its field, raised
before a checkpoint is opened, so no half-built runtime has to be taken down for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tierflow.config import EngineConfig
from tierflow.errors import ConfigError
from tierflow.tiers.io.cachedir import directory_problem, writable_problem


def check_trace_path(config: EngineConfig) -> None:
    """``trace_path`` must name a file (new or not) in a directory that takes new files: the
    timeline is written beside it under a temporary name and renamed onto it at close."""
    if config.trace_path is None:
        return
    path = Path(config.trace_path).expanduser().absolute()
    where = f"EngineConfig.trace_path {str(config.trace_path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a directory, but trace_path names the JSON file the timeline is "
                          f"written to when the engine closes; give a file name, e.g. {path / 'trace.json'}",
                          settings=("trace_path",))
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{where}: the directory {parent} does not exist (or is not a directory); create it, "
                          "or give a path in a directory that exists", settings=("trace_path",))
    why = writable_problem(parent)
    if why is not None:
        raise ConfigError(f"{where}: no file can be written in {parent} ({why}); give a path in a directory "
                          "this process can write", settings=("trace_path",))


_DIRECTORY_USES = {"kv_cache_dir": "the KV spill file (removed on close), or None to keep the KV cache off the disk",
                   "prefix_cache_dir": "the prefix cache's block files, or None to keep the prefix cache in memory "
                                       "only (prefix_cache_bytes)"}


def check_directories(config: EngineConfig) -> list[Path]:
    """Check ``kv_cache_dir`` and ``prefix_cache_dir`` before anything is read or allocated
    (``cachedir.directory_problem``: a file, a path under a file, a whole missing tree, a
    directory that takes no files are each a ConfigError naming the field). Returns those that
    do not exist yet: the open creates them (their last component only; a missing parent is an
    error, so a mistyped path is never made) and removes them again if it fails."""
    missing = []
    for field, use in _DIRECTORY_USES.items():
        value = getattr(config, field)
        if value is None:
            continue
        path = Path(value).expanduser().absolute()
        problem = directory_problem(path)
        if problem is not None:
            raise ConfigError(f"EngineConfig.{field} {str(value)!r}: {path} {problem}; create the directory or "
                              f"correct the path: {field} must be a directory this process can create files in, "
                              f"for {use}", settings=(field,))
        if not path.exists():
            missing.append(path)
    return missing


def expanded(path: str | os.PathLike[str] | None) -> Path | None:
    """A configured directory as ``check_directories`` checked it (``~`` expanded)."""
    return Path(path).expanduser() if path is not None else None
