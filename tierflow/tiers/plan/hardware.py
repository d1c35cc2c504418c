"""The profile JSON: a machine's measured (or described) hardware, plus plan overrides.

    {"version": 1,
     "hardware": {"device": "cuda", "device_memory_bytes": 8589934592, ...},
     "overrides": {"tiers": {"layers.0-7": "device"}, "prefetch_depth": 2, ...}}

``hardware`` is what the planner needs to know about a machine, so a user can plan for one
they do not have; ``tierflow probe`` writes it for the machine it runs on. ``overrides``
pin units to tiers and fix what the planner would otherwise choose. Pure: no torch, no
I/O (reading and writing the JSON file is ``tiers.probe.profile``'s job). Every invalid
document raises a ``ProfileError`` naming the key.

Numbers must also be physically plausible, or the planner predicts nonsense (a 1e300 GB/s
disk reads a model in 0 s). The bounds are generous, well beyond any machine of today:
bandwidths (``*_gbps``) at most ``MAX_GBPS`` = 100,000 GB/s (100 TB/s; HBM3e is ~5 TB/s),
memory and disk sizes (``*_bytes``) at most ``MAX_BYTES`` = 2**60 bytes (1 EiB), compute
(``prefill_tflops``) at most ``MAX_TFLOPS`` = 10^6 TFLOP/s (10^18 FLOP/s), and the overrides'
counts (prefetch depth, threads, tokens) at most ``MAX_COUNT`` = 2**40; every one must be > 0
(``device_overhead_bytes`` and the KV token budgets >= 0), and finite (no NaN or infinity).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from tierflow.errors import ProfileError

VERSION = 1
TIERS = ("device", "host", "disk")
DEVICE_KINDS = ("cpu", "cuda")
READERS = ("auto", "direct", "kvikio")   # how weights reach the device; see tierflow.tiers.io.kvikio.choose_reader
KVIKIO_MODES = ("", "gds", "compat", "absent")   # HardwareProfile.kvikio_mode; "" not probed (or a CPU device)
# The runtime's device overhead where the profile does not say: two cuBLAS workspaces (the
# compute stream's and one more stream's) of PyTorch's largest default size, 32 MiB (sm90 and
# later; 8.125 MiB before, which the caching allocator serves from a 20 MiB segment).
DEFAULT_DEVICE_OVERHEAD_BYTES = 2 * 32 * 2**20
MAX_GBPS = 100_000.0          # plausible ceilings: see the module docstring
MAX_BYTES = 2**60
MAX_TFLOPS = 1e6
MAX_COUNT = 2**40


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """What the planner knows about a machine. Bandwidths in GB/s (10^9 bytes per second).

    On a CPU device the device tier *is* RAM: ``device_memory_bytes`` is the RAM the engine
    may use, there is no separate host tier and no host↔device copy (``h2d_gbps`` and
    ``d2h_gbps`` are None).
    """

    device: str                          # "cpu" | "cuda"
    device_memory_bytes: int             # usable device memory (free, not total)
    host_memory_bytes: int               # available RAM
    disk_read_gbps: float                # O_DIRECT reads of the checkpoint's directory
    decode_gbps: float                   # weight bytes per second compute gets through at 1 token
    prefill_tflops: float                # matmul rate at prefill sizes, in 10^12 FLOP/s
    h2d_gbps: float | None = None        # pinned host → device copies (None on CPU)
    d2h_gbps: float | None = None        # device → pinned host copies (None on CPU)
    device_name: str = ""
    device_total_bytes: int | None = None
    pinned_memory_bytes: int | None = None   # how much RAM can be pinned (None: as much as is available)
    kv_disk_read_gbps: float | None = None   # the KV spill directory (None: same as disk_read_gbps)
    kv_disk_write_gbps: float | None = None
    disk_free_bytes: int | None = None       # free space in the KV spill directory
    compute_dtype: str = "bfloat16"          # the dtype the compute figures were measured in
    pcie_link: str = ""                      # the GPU's PCIe link as NVML reports it, e.g. "gen4 x16"
    pcie_link_gbps: float | None = None      # what that link could carry one way, before overheads
    # Device memory the runtime holds beside the plan's own buffers, for the engine's life: cuBLAS
    # workspaces (one per stream that multiplies, kept by PyTorch's caching allocator) and, where
    # GPUDirect Storage is used, cuFile's GPU bounce buffers. The probe measures it on CUDA (0 on
    # CPU); None: not measured, and the planner assumes ``DEFAULT_DEVICE_OVERHEAD_BYTES`` on CUDA.
    device_overhead_bytes: int | None = None
    kvikio_mode: str = ""                    # how kvikio would read here: one of KVIKIO_MODES (see kvikio_setup)

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def runtime_overhead_bytes(self) -> int:
        """``device_overhead_bytes``, or where it was not measured what the planner assumes:
        ``DEFAULT_DEVICE_OVERHEAD_BYTES`` on CUDA, nothing on CPU."""
        if self.device_overhead_bytes is not None:
            return self.device_overhead_bytes
        return 0 if self.is_cpu else DEFAULT_DEVICE_OVERHEAD_BYTES

    @property
    def kv_read_gbps(self) -> float:
        return self.kv_disk_read_gbps or self.disk_read_gbps

    @property
    def kv_write_gbps(self) -> float:
        return self.kv_disk_write_gbps or self.kv_read_gbps

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the user fixes instead of the planner. Unit selectors: "embed", "head",
    "layers.N" or "layers.A-B" (inclusive), "all"."""

    tiers: Mapping[str, str] = field(default_factory=dict)
    # caps, used as they are (no safety margin); the device's is a cap on all the engine takes from
    # the device, the runtime's overhead and the allocator's rounding included (tiers.plan.overhead)
    device_memory_bytes: int | None = None
    host_memory_bytes: int | None = None
    prefetch_depth: int | None = None
    io_threads: int | None = None
    io_block_bytes: int | None = None
    kv_budget_tokens: Mapping[str, int] = field(default_factory=dict)   # tier → most KV tokens there
    prefill_chunk_tokens: int | None = None
    mlp_chunk_tokens: int | None = None
    safety_margin: float | None = None                                  # fraction of each budget kept free
    reader: str | None = None       # "auto" | "direct" (O_DIRECT into pinned host) | "kvikio" (disk → GPU)
    # the profile file these came from ("" if none), named by the errors the plan finds in them
    # (a selector beyond the model's layers); not part of the document, nor of equality
    source: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()
                if v not in (None, {}) and k != "source"}


@dataclass(frozen=True, slots=True)
class Profile:
    hardware: HardwareProfile | None
    overrides: Overrides
    measured: Mapping[str, Any] = field(default_factory=dict)   # provenance written by the probe

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": VERSION}
        if self.hardware is not None:
            doc["hardware"] = self.hardware.to_json()
        doc["overrides"] = self.overrides.to_json()
        if self.measured:
            doc["measured"] = dict(self.measured)
        return doc


# ----------------------------------------------------------------------------- parsing
_INT, _FLOAT, _STR = "int", "number", "string"
_HARDWARE_TYPES = {
    "device": _STR, "device_memory_bytes": _INT, "host_memory_bytes": _INT, "disk_read_gbps": _FLOAT,
    "decode_gbps": _FLOAT, "prefill_tflops": _FLOAT, "h2d_gbps": _FLOAT, "d2h_gbps": _FLOAT,
    "device_name": _STR, "device_total_bytes": _INT, "pinned_memory_bytes": _INT,
    "kv_disk_read_gbps": _FLOAT, "kv_disk_write_gbps": _FLOAT, "disk_free_bytes": _INT, "compute_dtype": _STR,
    "pcie_link": _STR, "pcie_link_gbps": _FLOAT, "device_overhead_bytes": _INT, "kvikio_mode": _STR,
}
_HARDWARE_ZERO_OK = ("device_overhead_bytes",)     # >= 0 (every other number must be > 0)
_HARDWARE_REQUIRED = ("device", "device_memory_bytes", "host_memory_bytes", "disk_read_gbps", "decode_gbps",
                      "prefill_tflops")
_OVERRIDE_INTS = ("prefetch_depth", "io_threads", "io_block_bytes", "prefill_chunk_tokens", "mlp_chunk_tokens",
                  "device_memory_bytes", "host_memory_bytes")
_SELECTOR = re.compile(r"all|embed|head|layers\.([0-9]+)(?:-([0-9]+))?")


def _limit(key: str) -> tuple[float, str]:
    """The plausible ceiling of a numeric key, and how to say it."""
    if key.endswith("_gbps"):
        return MAX_GBPS, f"{MAX_GBPS:g} GB/s (100 TB/s)"
    if key.endswith("_bytes"):
        return MAX_BYTES, "2**60 bytes (1 EiB)"
    if key == "safety_margin":
        return 1.0, "1"
    if key.endswith("_tflops"):
        return MAX_TFLOPS, f"{MAX_TFLOPS:g} TFLOP/s (10^18 FLOP/s)"
    return MAX_COUNT, "2**40"


def _typed(where: str, value: Any, kind: str, *, positive: bool = True) -> Any:
    """``value`` checked to be of ``kind``; a number also finite, > 0 (>= 0 unless
    ``positive``) and at most the plausible ceiling of its key (the last part of ``where``)."""
    ok = (kind == _STR and isinstance(value, str)) or \
         (kind == _INT and isinstance(value, int) and not isinstance(value, bool)) or \
         (kind == _FLOAT and isinstance(value, (int, float)) and not isinstance(value, bool) and
          (isinstance(value, int) or math.isfinite(value)))
    if not ok:
        raise ProfileError(f"{where} must be a {kind}, got {_shown(value)}")
    if kind == _STR:
        return value
    ceiling, said = _limit(where.rsplit(".", 1)[-1])
    if not (value > 0 if positive else value >= 0):
        raise ProfileError(f"{where} must be {'> 0' if positive else '>= 0'}, got {_shown(value)}")
    if value > ceiling:
        raise ProfileError(f"{where} = {_shown(value)} is beyond its plausible range: at most {said}; correct the "
                           "profile (or measure this machine again with `tierflow probe`)")
    return float(value) if kind == _FLOAT else value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _object(where: str, value: Any, allowed: tuple[str, ...] | dict[str, Any] | None) -> dict[str, Any]:
    """``value`` as a dict whose keys are all in ``allowed`` (None: any key)."""
    if not isinstance(value, dict):
        raise ProfileError(f"{where} must be a JSON object, got {type(value).__name__}")
    for key in value:
        if allowed is not None and key not in allowed:
            raise ProfileError(f"{where}.{key}: unknown key; allowed keys: {', '.join(allowed)}")
    return value


def parse_hardware(doc: Any, where: str = "hardware") -> HardwareProfile:
    doc = _object(where, doc, _HARDWARE_TYPES)
    for key in _HARDWARE_REQUIRED:
        if doc.get(key) is None:
            raise ProfileError(f"{where}.{key} is required (keys every hardware section needs: "
                               f"{', '.join(_HARDWARE_REQUIRED)})")
    values = {key: None if doc.get(key) is None else
              _typed(f"{where}.{key}", doc[key], kind, positive=key not in _HARDWARE_ZERO_OK)
              for key, kind in _HARDWARE_TYPES.items() if key in doc}
    if values.get("kvikio_mode") is not None and values["kvikio_mode"] not in KVIKIO_MODES:
        raise ProfileError(f"{where}.kvikio_mode must be one of {KVIKIO_MODES}, got {values['kvikio_mode']!r}")
    if values["device"] not in DEVICE_KINDS:
        raise ProfileError(f"{where}.device must be one of {DEVICE_KINDS}, got {values['device']!r}")
    if values["device"] == "cuda":
        for key in ("h2d_gbps", "d2h_gbps"):
            if values.get(key) is None:
                raise ProfileError(f"{where}.{key} is required when device is 'cuda'")
    return HardwareProfile(**values)


def parse_selector(selector: str, num_layers: int | None = None, source: str = "") -> tuple[int, int]:
    """A unit selector as an inclusive range of unit indices (embed 0, layer i → i + 1, head L + 1).
    Without ``num_layers`` it is only validated. ``source``: the profile file, for messages."""
    m = _SELECTOR.fullmatch(selector) if isinstance(selector, str) else None
    if m is None:
        raise ProfileError(f"overrides.tiers: {selector!r} is not a unit selector; write 'embed', 'head', "
                           "'layers.N', 'layers.A-B' or 'all'")
    if m.group(1):
        first, last = _layer(m.group(1)), _layer(m.group(2) or m.group(1))
        if first > last:
            raise ProfileError(f"overrides.tiers: {selector!r} is a reversed range; write 'layers.{last}-{first}'")
        if num_layers is not None and last >= num_layers:
            raise ProfileError(f"{source + ': ' if source else ''}overrides.tiers: {selector!r} is out of range; "
                               f"the model has layers 0-{num_layers - 1}; change the selector in the profile")
        return first + 1, last + 1
    if num_layers is None:   # validating the document: the model is not known yet
        return 0, 0
    return {"all": (0, num_layers + 1), "embed": (0, 0), "head": (num_layers + 1, num_layers + 1)}[selector]


def _layer(digits: str) -> int:
    """A selector's layer number; one longer than any model's (or than ``int()`` parses) as 10**18."""
    return int(digits) if len(digits) <= 18 else 10**18


def parse_overrides(doc: Any, where: str = "overrides", source: str = "") -> Overrides:
    allowed = tuple(f.name for f in fields(Overrides) if f.name != "source")
    doc = _object(where, doc, allowed)
    values: dict[str, Any] = {}
    for key in _OVERRIDE_INTS:
        if doc.get(key) is not None:
            values[key] = _typed(f"{where}.{key}", doc[key], _INT)
    if values.get("io_block_bytes", 4096) % 4096:
        raise ProfileError(f"{where}.io_block_bytes must be a multiple of 4096, got {values['io_block_bytes']}")
    if doc.get("safety_margin") is not None:
        margin = _typed(f"{where}.safety_margin", doc["safety_margin"], _FLOAT, positive=False)
        if not 0 <= margin < 1:
            raise ProfileError(f"{where}.safety_margin must be in [0, 1), got {margin}")
        values["safety_margin"] = margin
    if doc.get("reader") is not None:
        reader = _typed(f"{where}.reader", doc["reader"], _STR)
        if reader not in READERS:
            raise ProfileError(f"{where}.reader must be one of {READERS}, got {reader!r}")
        values["reader"] = reader
    tiers = _object(f"{where}.tiers", doc.get("tiers", {}), None)
    for selector, tier in tiers.items():
        parse_selector(selector)
        if tier not in TIERS:
            raise ProfileError(f"{where}.tiers.{selector} must be one of {TIERS}, got {tier!r}")
    values["tiers"] = dict(tiers)
    kv = _object(f"{where}.kv_budget_tokens", doc.get("kv_budget_tokens", {}), TIERS)
    values["kv_budget_tokens"] = {tier: _typed(f"{where}.kv_budget_tokens.{tier}", n, _INT, positive=False)
                                  for tier, n in kv.items()}
    return Overrides(**values, source=source)


def parse_profile(doc: Any, source: str = "") -> Profile:
    """``source``: the file the document was read from ("" for a dict), kept in the overrides."""
    doc = _object("profile", doc, ("version", "hardware", "overrides", "measured"))
    version = doc.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise ProfileError(f"profile.version must be {VERSION}, got {version!r}")
    hardware = parse_hardware(doc["hardware"]) if doc.get("hardware") is not None else None
    overrides = parse_overrides(doc.get("overrides") or {}, source=source)
    measured = doc.get("measured") or {}
    if not isinstance(measured, dict):
        raise ProfileError("profile.measured must be a JSON object")
    return Profile(hardware, overrides, measured)
