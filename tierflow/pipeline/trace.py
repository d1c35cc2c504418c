"""A timeline of the pipeline's stages, written as a Chrome-trace / Perfetto JSON file.

Every stage records complete spans ("ph": "X") on a track of its own — the weight reads, the
compute worker, the KV block reads, the expert reads, one span per sweep — so loading the
file in ui.perfetto.dev or chrome://tracing shows whether the reads of unit i+1 overlapped
the compute of unit i. Recording is a list append of a tuple (thread-safe in CPython); the
file is written once, at the end, to a temporary name and renamed. On CUDA, "compute" is
the host enqueueing kernels; "upload" (the copy stream) and "gpu compute" (the compute
stream) are the device's own times, from events, on the same clock. ``NULL_TRACER`` records
nothing and is what every stage gets when tracing is off.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TRACKS = ("sweeps", "disk: weights", "upload", "compute", "gpu compute", "disk: KV blocks", "disk: experts",
          "prefix cache")
MAX_EVENTS = 2_000_000      # beyond this the oldest half is dropped (the file says so)


class Tracer:
    enabled = True

    def __init__(self) -> None:
        self._events: list[tuple[str, str, float, float, dict[str, Any] | None]] = []
        self._origin = time.perf_counter()
        self._dropped = 0

    def span(self, track: str, name: str, start: float, end: float, **args: Any) -> None:
        """A span from ``start`` to ``end`` (``time.perf_counter()`` seconds) on ``track``."""
        self._events.append((track, name, start, end, args or None))
        if len(self._events) > MAX_EVENTS:
            half = len(self._events) // 2
            del self._events[:half]
            self._dropped += half

    @contextmanager
    def timed(self, track: str, name: str, **args: Any) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.span(track, name, start, time.perf_counter(), **args)

    def document(self) -> dict[str, Any]:
        tracks = {name: i for i, name in enumerate(TRACKS)}
        events: list[dict[str, Any]] = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name",
                                         "args": {"name": name}} for name, tid in tracks.items()]
        events.append({"ph": "M", "pid": 1, "tid": 0, "name": "process_name", "args": {"name": "tierflow"}})
        for track, name, start, end, args in list(self._events):
            event = {"ph": "X", "pid": 1, "tid": tracks.setdefault(track, len(tracks)), "name": name,
                     "ts": round((start - self._origin) * 1e6, 3), "dur": round(max(0.0, end - start) * 1e6, 3)}
            if args:
                event["args"] = args
            events.append(event)
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"producer": "tierflow", "dropped_events": self._dropped}}

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.document()))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class _NullTracer(Tracer):
    enabled = False

    def span(self, track: str, name: str, start: float, end: float, **args: Any) -> None:
        return None


NULL_TRACER: Tracer = _NullTracer()
