"""A timeline of the pipeline's stages, written as a Chrome-trace / Perfetto JSON file.

Every stage records complete spans ("ph": "X") on a track of its own — the weight reads, the
compute worker, the KV block reads, the expert reads, one span per sweep — so loading the
file in ui.perfetto.dev or chrome://tracing shows whether the reads of unit i+1 overlapped
the compute of unit i. Recording is a list append of a tuple (thread-safe in CPython); the
file is written once, at the end, to a temporary name and renamed. On CUDA, "compute" is
the host enqueueing kernels; "upload" (the copy stream) and "gpu compute" (the compute
stream) are the device's own times, from events, on the same clock. ``NULL_TRACER`` records
nothing and is what every stage gets when tracing is off.

Concurrent spans. Several reads are in flight at once (the prefetch depth of the weight
stream, the KV loader's window, expert read-ahead, one prefix-cache reuse per admitted
request), and the JSON format allows complete events on one thread track only if they
nest: Perfetto draws a span that starts inside another and ends after it at the wrong depth
or drops it. So when the file is written, each track is split into *lanes*: a span goes on
the first lane whose last span has ended by its start, and a lane is a track of its own
("disk: weights", then "disk: weights · 2", ...), next to its first lane. A track needs as
many lanes as it had spans in flight at its busiest, and on each lane the spans are
disjoint, so every viewer draws every span at depth 0 and the lanes read as the queue depth.
Async slices ("ph": "b"/"e" with ids) would be the other way, but Perfetto turns each id
into its own track and merges them by name or not depending on its version, and
chrome://tracing packs them differently again; lanes of complete events look the same
everywhere. Packing happens at write time, on the spans' integer nanoseconds, so recording
stays one append and the file holds exactly the times the packing checked.

The file follows the Chrome JSON trace format: "traceEvents" first (older Perfetto readers
skip to the first "[" of the file), timestamps in microseconds, no "displayTimeUnit" (some
Perfetto versions read it as the unit of "ts", which would scale every time by 1000), a
track named (a "thread_name" record) only when it has spans, no NaN or Infinity.
``check_trace`` / ``check_trace_file`` say what in a document breaks those rules.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# the order tracks appear in; any other track follows these, in the order it first got a span
TRACKS = ("sweeps", "disk: weights", "upload", "compute", "gpu compute", "disk: KV blocks", "disk: experts",
          "prefix cache")
LANE_SEPARATOR = " · "          # "disk: weights · 2": the second lane of "disk: weights"
MAX_EVENTS = 2_000_000          # beyond this the oldest half is dropped (the file says so)
PID = 1

Span = tuple[str, str, float, float, "dict[str, Any] | None"]


class Tracer:
    enabled = True

    def __init__(self) -> None:
        self._events: list[Span] = []
        self._origin = time.perf_counter()
        self._dropped = 0
        self._drop_lock = threading.Lock()

    def span(self, track: str, name: str, start: float, end: float, **args: Any) -> None:
        """A span from ``start`` to ``end`` (``time.perf_counter()`` seconds) on ``track``.
        Spans on one track may overlap: the file puts overlapping ones on separate lanes."""
        self._events.append((track, name, start, end, args or None))
        if len(self._events) > MAX_EVENTS:
            with self._drop_lock:
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
        """The trace as a Chrome JSON trace document (see the module docstring)."""
        recorded = list(self._events)
        spans = [e for e in recorded if math.isfinite(e[2]) and math.isfinite(e[3])]
        invalid = len(recorded) - len(spans)         # not drawable: left out, and counted
        # a device time may precede the tracer's creation; no timestamp may be negative
        origin = min(self._origin, min((e[2] for e in spans), default=self._origin))
        by_track: dict[str, list[tuple[int, int, str, dict[str, Any] | None]]] = {t: [] for t in TRACKS}
        for track, name, start, end, args in spans:
            start_ns = round((start - origin) * 1e9)
            by_track.setdefault(track, []).append((start_ns, max(start_ns, round((end - origin) * 1e9)), name, args))
        events: list[dict[str, Any]] = [{"ph": "M", "pid": PID, "tid": 0, "name": "process_name",
                                         "args": {"name": "tierflow"}}]
        tid = 0
        for track, track_spans in by_track.items():
            for lane, lane_spans in enumerate(_lanes(track_spans)):
                tid += 1
                name = track if lane == 0 else f"{track}{LANE_SEPARATOR}{lane + 1}"
                events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": name}})
                events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index",
                               "args": {"sort_index": tid}})
                for start_ns, end_ns, span_name, args in lane_spans:
                    event = {"ph": "X", "pid": PID, "tid": tid, "name": span_name, "ts": start_ns / 1e3,
                             "dur": (end_ns - start_ns) / 1e3}
                    if args:
                        event["args"] = {k: _json_value(v) for k, v in args.items()}
                    events.append(event)
        return {"traceEvents": events,
                "otherData": {"producer": "tierflow", "dropped_events": self._dropped, "invalid_spans": invalid}}

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.document(), allow_nan=False, default=str))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _lanes(spans: list[tuple[int, int, str, Any]]) -> list[list[tuple[int, int, str, Any]]]:
    """Spans (start_ns, end_ns, ...) of one track on as few lanes of disjoint spans as their
    overlap needs (touching ends allowed): each goes on the first lane free at its start."""
    lanes: list[list[tuple[int, int, str, Any]]] = []
    ends: list[int] = []
    for span in sorted(spans, key=lambda s: (s[0], s[1])):
        for lane, end in enumerate(ends):
            if end <= span[0]:
                break
        else:
            lane = len(ends)
            lanes.append([])
            ends.append(0)
        lanes[lane].append(span)
        ends[lane] = span[1]
    return lanes


def _json_value(value: Any) -> Any:
    """An argument as JSON can hold it: non-finite floats (JSON has none) as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class _NullTracer(Tracer):
    enabled = False

    def span(self, track: str, name: str, start: float, end: float, **args: Any) -> None:
        return None

    @contextmanager
    def timed(self, track: str, name: str, **args: Any) -> Iterator[None]:
        yield


NULL_TRACER: Tracer = _NullTracer()


# -- checking a trace document -------------------------------------------------------------------

TOLERANCE_US = 1e-3             # float rounding of microsecond timestamps (a nanosecond)
_THREAD_PHASES = {"X", "B", "E", "i", "I"}
_ASYNC_OPEN, _ASYNC_CLOSE = {"b": "e", "S": "F"}, {"e": "b", "F": "S"}
_PHASES = _THREAD_PHASES | {"M", "b", "e", "n", "S", "T", "p", "F", "C", "s", "t", "f", "P", "O", "N", "D", "R",
                            "c", "(", ")"}
_OPENING = re.compile(r'\s*(\[|\{\s*"traceEvents"\s*:\s*\[)')


def check_trace_file(path: str | os.PathLike[str]) -> list[str]:
    """What in the trace file at ``path`` Perfetto would refuse or draw wrong (empty: nothing);
    ``check_trace`` lists the rules, and besides: the file is strict JSON (no NaN or Infinity)
    and its first "[" opens the event list (older Perfetto readers skip to it)."""
    text = Path(path).read_text()
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        return [f"{path}: not valid JSON ({exc})"]
    problems = [] if _OPENING.match(text) else [f'{path}: the file does not open with its event list '
                                                  '("[" or {"traceEvents": [)']
    return problems + check_trace(doc)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def check_trace(doc: Any, *, tolerance_us: float = TOLERANCE_US) -> list[str]:
    """What in a Chrome JSON trace document breaks the format or Perfetto's drawing of it
    (empty: nothing): the document is a ``{"traceEvents": [...]}`` object (or the bare list);
    every event has a known "ph", a name, integer pid and tid, and (metadata aside) a finite,
    non-negative "ts" ("dur" too for "X"); on each track (pid, tid) the complete and B/E
    spans, sorted by start, each nest inside the one enclosing them or are disjoint from it
    (touching ends allowed, within ``tolerance_us``); B/E and async ("b"/"e", "S"/"F") pairs
    are balanced; and every track a "thread_name" record declares has a span."""
    if isinstance(doc, dict):
        events, problems = doc.get("traceEvents"), []
        unit = doc.get("displayTimeUnit")
        if unit is not None and unit not in ("ms", "ns"):
            problems.append(f'displayTimeUnit must be "ms" or "ns", got {unit!r}')
    else:
        events, problems = doc, []
    if not isinstance(events, list):
        return [f"expected a traceEvents list, got {type(events).__name__}"]
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"the document is not strict JSON: {exc}")
    spans: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    opened: dict[tuple[int, int], list[tuple[float, str]]] = {}
    asyncs: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
    declared: dict[tuple[int, int], str] = {}
    marked: set[tuple[int, int]] = set()            # tracks with an instant event on them
    for i, e in sorted(enumerate(events), key=lambda p: _ts_key(p[1])):
        problem = _event_problem(e)
        if problem:
            problems.append(f"event {i}: {problem}: {e!r}"[:300])
            continue
        ph, track, name = e["ph"], (e["pid"], e["tid"]), e.get("name", "")
        if ph == "M" and name == "thread_name":
            label = (e.get("args") or {}).get("name")
            if not isinstance(label, str):
                problems.append(f"event {i}: a thread_name without a name in its args: {e!r}"[:300])
            elif declared.setdefault(track, label) != label:
                problems.append(f"event {i}: track {track} named twice ({declared[track]!r}, then {label!r})")
        elif ph in ("i", "I") and e.get("s", "t") == "t":
            marked.add(track)
        elif ph == "X":
            spans.setdefault(track, []).append((e["ts"], e["ts"] + e["dur"], name))
        elif ph == "B":
            opened.setdefault(track, []).append((e["ts"], name))
        elif ph == "E":
            if not opened.get(track):
                problems.append(f"event {i}: an E on track {track} with no B open")
            else:
                start, begun = opened[track].pop()
                spans.setdefault(track, []).append((start, e["ts"], begun))
        elif ph in _ASYNC_OPEN or ph in _ASYNC_CLOSE:
            key = (e["pid"], e.get("cat"), e.get("id", e.get("id2")), e.get("scope"))
            if ph in _ASYNC_OPEN:
                asyncs.setdefault(key, []).append((ph, name))
            elif not asyncs.get(key) or asyncs[key][-1][0] != _ASYNC_CLOSE[ph]:
                problems.append(f"event {i}: async {ph!r} {name!r} (id {key[2]!r}) with nothing open to close")
            else:
                asyncs[key].pop()
    problems += [f"track {t}: B {n!r} at {ts} never ends" for t, stack in opened.items() for ts, n in stack]
    problems += [f"async {n!r} (cat {k[1]!r}, id {k[2]!r}) opened with {ph!r} and never closed"
                 for k, stack in asyncs.items() for ph, n in stack]
    for track, track_spans in spans.items():
        problems += _nesting_problems(track, declared.get(track, "unnamed"), track_spans, tolerance_us)
    problems += [f"track {t} ({n!r}) is declared but has no span" for t, n in declared.items()
                 if not spans.get(t) and t not in marked]
    return problems


def _ts_key(e: Any) -> float:
    ts = e.get("ts") if isinstance(e, dict) else None
    return ts if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) else -1.0


def _event_problem(e: Any) -> str | None:
    if not isinstance(e, dict):
        return "not an object"
    ph = e.get("ph")
    if ph not in _PHASES:
        return f"unknown phase {ph!r}"
    if not isinstance(e.get("name", ""), str):
        return "a name that is not a string"
    for key in ("pid", "tid"):
        if not isinstance(e.get(key), int) or isinstance(e.get(key), bool):
            return f"{key} {e.get(key)!r} is not an integer"
    for key in ("ts", "dur") if ph == "X" else () if ph == "M" else ("ts",):
        value = e.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return f"{key} {value!r} is not a finite, non-negative number"
    if "args" in e and not isinstance(e["args"], dict):
        return "args that are not an object"
    return None


def _nesting_problems(track: tuple[int, int], label: str, spans: list[tuple[float, float, str]],
                      tolerance_us: float) -> list[str]:
    problems: list[str] = []
    stack: list[tuple[float, float, str]] = []
    for start, end, name in sorted(spans, key=lambda s: (s[0], -s[1])):
        while stack and stack[-1][1] <= start + tolerance_us:
            stack.pop()
        if stack and end > stack[-1][1] + tolerance_us:
            outer = stack[-1]
            problems.append(f"track {track} ({label!r}): {name!r} [{start}, {end}] overlaps {outer[2]!r} "
                            f"[{outer[0]}, {outer[1]}] without nesting in it")
            continue
        stack.append((start, end, name))
    return problems
