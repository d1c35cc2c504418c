"""The profile JSON file: read (``load_profile``) and written atomically (``save_profile``).

The records and their validation live in ``tiers.plan.hardware``, which is pure; this module
is the file I/O around them, beside the probe that writes profiles.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from tierflow.errors import ProfileError
from tierflow.tiers.plan.hardware import Profile, parse_profile
from tierflow.tiers.plan.routing import RoutingStats


def load_profile(source: str | os.PathLike[str] | Mapping[str, Any]) -> Profile:
    """A profile from a path to a JSON file, or from an already parsed document (a dict, as
    ``EngineConfig(profile={...})`` passes it: the same checks apply). Anything wrong is a
    ``ProfileError`` naming the file: unreadable, not UTF-8, not JSON, or a document that
    ``parse_profile`` rejects."""
    if isinstance(source, Mapping):
        return parse_profile(dict(source))
    path = Path(source)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path} is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
                           "a profile is a JSON file: write it again, or make a new one with `tierflow probe`") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except (ValueError, RecursionError) as exc:      # an integer of over 4300 digits; arrays nested too deep
        raise ProfileError(f"{path} cannot be parsed as JSON ({exc})") from exc
    try:
        return parse_profile(doc, source=str(path))
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}", settings=exc.settings) from None


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write atomically (a temporary file renamed into place): never a half-written profile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_json(path, profile.to_json(), indent=2)


def _write_json(path: Path, document: Any, indent: int | None = None) -> Path:
    """``document`` as JSON at ``path``, through a temporary file renamed into place."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=indent)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def save_routing(stats: RoutingStats, path: str | os.PathLike[str]) -> Path:
    """Write measured routing (``RoutingStats.to_json``) to ``path`` atomically, for
    ``tierflow plan --routing``."""
    return _write_json(Path(path).expanduser(), stats.to_json())


def load_routing(path: str | os.PathLike[str]) -> RoutingStats:
    """Measured routing from ``save_routing``'s JSON; ValueError naming the file and the problem."""
    try:
        document = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read the routing statistics {path}: {exc}") from None
    return RoutingStats.from_json(document, str(path))
