"""Shared helpers for the benchmarks: a fast random Llama-shape checkpoint, an O_DIRECT disk
bandwidth probe that uses the engine's own reader, and small timing utilities."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tierflow import SamplingParams
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, ByteRange, UnitLayout
from tierflow.tiers.probe.measure import read_pass
from tierflow.tiers.io.reader import DiskReader, aligned_empty

GB = 1e9
PROMPT = [1, 415, 2936, 9060, 17354, 8309, 23517, 975, 278, 17366, 11203, 29889]   # 12 token ids
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class ModelShape:
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    layers: int = 0            # 0: the fewest layers that make the weights >= 1 GiB
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        h, i, d = self.hidden, self.intermediate, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        return h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h

    def fixed_params(self) -> int:      # embedding + untied head + final norm
        return 2 * self.vocab * self.hidden + self.hidden

    def resolved(self, min_bytes: int = 2**30) -> "ModelShape":
        if self.layers:
            return self
        itemsize = DTYPES[self.dtype].itemsize
        need = math.ceil((min_bytes / itemsize - self.fixed_params()) / self.layer_params())
        return ModelShape(**{**asdict(self), "layers": max(need, 2)})

    def total_bytes(self) -> int:
        return (self.fixed_params() + self.layers * self.layer_params()) * DTYPES[self.dtype].itemsize


def llama_config(shape: ModelShape) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "num_hidden_layers": shape.layers, "vocab_size": shape.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": shape.dtype, "dtype": shape.dtype,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
        "initializer_range": 0.02,
    }


def _reusable(directory: Path, meta: dict[str, Any]) -> bool:
    """Whether ``directory`` holds a checkpoint built with ``meta``; if not, its stale record goes."""
    meta_path = directory / "bench_meta.json"
    if meta_path.exists() and (directory / "model.safetensors").exists() and (directory / "config.json").exists():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return True
        except ValueError:
            pass
    meta_path.unlink(missing_ok=True)
    return False


def build_checkpoint(directory: Path, shape: ModelShape, *, seed: int = 0, std: float = 0.02) -> tuple[Path, bool]:
    """Write (or reuse) ``directory``/model.safetensors + config.json. Returns (dir, reused)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "bench_meta.json"
    weights = directory / "model.safetensors"
    meta = {"shape": asdict(shape), "seed": seed, "std": std}
    if _reusable(directory, meta):
        return directory, True
    dtype = DTYPES[shape.dtype]
    gen = torch.Generator().manual_seed(seed)
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d

    def normal(*dims: int) -> torch.Tensor:
        t = torch.empty(dims, dtype=torch.float32)
        t.normal_(0.0, std, generator=gen)
        return t if dtype == torch.float32 else t.to(dtype)

    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(shape.vocab, h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
        "lm_head.weight": normal(shape.vocab, h),
    }
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        }
    save_file(tensors, str(weights), metadata={"format": "pt"})
    del tensors
    (directory / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
    # Make sure the data is on the disk before anyone reads it with O_DIRECT.
    fd = os.open(weights, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    meta_path.write_text(json.dumps(meta))
    return directory, False


# --------------------------------------------------------------------------- disk bandwidth
HUGE_PAGE_BYTES = 2 * 2**20
_MADV_HUGEPAGE = 14


def long_context_model(directory: Path) -> Path:
    """The long-context benchmarks' random Llama (hidden 512, 4 layers, 8 query / 2 KV heads,
    64k positions), built in ``directory`` unless it is there already."""
    from tierflow.testing import build_random_llama

    if (directory / "config.json").exists():
        return directory
    return build_random_llama(directory, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                              intermediate_size=1536, vocab_size=4096, max_position_embeddings=65536)


def hugepage_empty(nbytes: int) -> torch.Tensor:
    """Like ``aligned_empty`` (4 KiB aligned uint8 buffer) but 2 MiB aligned and advised
    MADV_HUGEPAGE before first touch, so that it is backed by physically contiguous 2 MiB
    pages where transparent huge pages are enabled ("always" or "madvise")."""
    raw = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % HUGE_PAGE_BYTES
    view = raw[skip:skip + nbytes]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(view.data_ptr()), ctypes.c_size_t(-(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES),
                     _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass        # no THP here: an ordinary buffer
    return view


def physical_runs(buffer: torch.Tensor, block_bytes: int) -> float | None:
    """Mean number of physically contiguous runs per ``block_bytes`` of ``buffer`` (from
    /proc/self/pagemap; None without the permission to see frame numbers). A block whose
    pages are scattered needs that many DMA segments; the block layer splits a request
    whose segment count exceeds the device's max_segments."""
    page = os.sysconf("SC_PAGE_SIZE")
    start, n = buffer.data_ptr() // page, buffer.numel() // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start * 8)
            raw = f.read(n * 8)
    except OSError:
        return None
    frames = [int.from_bytes(raw[i:i + 8], "little") & ((1 << 55) - 1) for i in range(0, len(raw), 8)]
    if not any(frames):
        return None
    per_block = max(block_bytes // page, 1)
    runs = blocks = 0
    for b in range(0, n, per_block):
        chunk = frames[b:b + per_block]
        runs += 1 + sum(1 for x, y in zip(chunk, chunk[1:]) if y != x + 1)
        blocks += 1
    return runs / blocks


def max_segments(path: str) -> int | None:
    """The block device's max_segments for the filesystem holding ``path`` (None if unknown)."""
    try:
        dev = os.stat(path).st_dev
        sys_dir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        queue = sys_dir / "queue" if (sys_dir / "queue").exists() else sys_dir / ".." / "queue"
        return int((queue / "max_segments").read_text())
    except (OSError, ValueError):
        return None


class DiskProbe:
    """O_DIRECT read bandwidth of a whole file through the engine's own ``DiskReader``
    (same block size, same thread count = queue depth) and the weight stream's own access
    pattern: the file in ``slot_bytes`` chunks into a ring of ``in_flight`` reused buffers
    with ``in_flight`` chunk reads outstanding (minus compute).

    Two rings: "regular" buffers from ``aligned_empty`` (how the engine allocates its
    staging slots) and "hugepage" buffers (``hugepage_empty``). The first is much slower
    when the buffer's pages are physically scattered (more contiguous runs per request than
    the device's max_segments: the block layer splits each request), so its rate depends on
    how fragmented free memory was at allocation; the second measures what the disk
    delivers. Buffers are allocated and pre-faulted once, so page faults are never timed."""

    KINDS = ("regular", "hugepage")

    def __init__(self, path: str, *, io_threads: int, block_bytes: int, slot_bytes: int, in_flight: int,
                 direct_io: str = "auto") -> None:
        self.path, self.io_threads, self.block_bytes = path, io_threads, block_bytes
        self.slot_bytes, self.in_flight = slot_bytes, in_flight
        size = os.path.getsize(path)
        self.file_bytes = -(-size // ALIGN_BYTES) * ALIGN_BYTES
        self.chunks = [UnitLayout(-1, f"chunk{i}", (ByteRange(path, start, n, 0),), (), n, n)
                       for i, start in enumerate(range(0, self.file_bytes, slot_bytes))
                       for n in [min(slot_bytes, self.file_bytes - start)]]
        self.rings = {"regular": [aligned_empty(slot_bytes) for _ in range(in_flight)],
                      "hugepage": [hugepage_empty(slot_bytes) for _ in range(in_flight)]}
        for ring in self.rings.values():
            for buffer in ring:
                buffer.fill_(0)
        self.reader = DiskReader([path], io_threads=io_threads, block_bytes=block_bytes, direct_io=direct_io)
        self.passes: dict[str, list[float]] = {kind: [] for kind in self.KINDS}

    def runs_per_block(self) -> dict[str, float | None]:
        out = {}
        for kind, ring in self.rings.items():
            got = [physical_runs(b, self.block_bytes) for b in ring]
            out[kind] = None if None in got else sum(got) / len(got)
        return out

    async def _pass(self, ring: list[torch.Tensor]) -> float:
        seconds = await read_pass(self.reader, self.chunks, ring)
        return sum(layout.buffer_bytes for layout in self.chunks) / seconds / GB

    async def measure(self, passes: int = 2) -> dict[str, list[float]]:
        got: dict[str, list[float]] = {kind: [] for kind in self.KINDS}
        for _ in range(passes):
            for kind in self.KINDS:
                got[kind].append(await self._pass(self.rings[kind]))
        for kind in self.KINDS:
            self.passes[kind] += got[kind]
        return got

    @property
    def mode(self) -> str:
        modes = set(self.reader.statistics().modes.values())
        return modes.pop() if len(modes) == 1 else "mixed"

    def close(self) -> None:
        self.reader.close()
        self.rings = {}


# --------------------------------------------------------------------------- CPU load of others
class CpuMonitor:
    """How busy the machine's CPUs were with work that is *not* this process (other
    processes, and steal time from the hypervisor) over a phase: benchmarks on a 2-core
    machine are only meaningful when this is small."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy = user + nice + system + steal      # irq / softirq left out: mostly our own disk completions
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return busy / tick, (int(own[11]) + int(own[12])) / tick, time.perf_counter()

    def restart(self) -> None:
        self._start = self._sample()

    def foreign_load(self) -> float:
        """Other work, in CPUs' worth (0.0 .. ncpu), since the start."""
        busy, own, now = self._sample()
        return max(0.0, (busy - self._start[0]) - (own - self._start[1])) / max(now - self._start[2], 1e-9)


# --------------------------------------------------------------------------- timing
def per_token(stamps: list[float]) -> dict[str, float]:
    """stamps[k] = time token k+1 became available. Decode time excludes the first token."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    n = len(gaps)
    return {"mean_s": (stamps[-1] - stamps[0]) / n if n else float("nan"),
            "p50_s": statistics.median(gaps) if gaps else float("nan"),
            "min_s": min(gaps) if gaps else float("nan"),
            "max_s": max(gaps) if gaps else float("nan")}


class TimingStreamer:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:           # generate() first puts the prompt
            self._prompt_seen = True
            return
        now = time.perf_counter()
        self.stamps.extend([now] * int(value.numel()))

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------- engine runs
async def quiesce(engine: Any, poll_s: float = 0.05) -> None:
    """Wait until the weight stream's read-ahead (which runs past the end of a request)
    has finished, so that nothing else uses the disk while we probe it."""
    last = -1
    while (now := engine.stats().bytes_read_from_disk) != last:
        last = now
        await asyncio.sleep(poll_s)


async def timed_stream(engine: Any, new_tokens: int, prompt: list[int] = PROMPT) -> dict[str, Any]:
    """Greedy decode of ``new_tokens``; stats deltas over the decode window (first token excluded)."""
    cpu = CpuMonitor()
    stamps: list[float] = []
    tokens: list[int] = []
    first = None
    async for chunk in engine.stream(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
        now = time.perf_counter()
        if chunk.token_ids:
            stamps += [now] * len(chunk.token_ids)
            tokens += chunk.token_ids
            if first is None:
                first = engine.stats()
    last = engine.stats()
    n = len(tokens) - 1
    window = stamps[-1] - stamps[0]
    delta = {k: getattr(last, k) - getattr(first, k) for k in
             ("bytes_streamed", "bytes_read_from_disk", "read_s", "compute_s", "stall_s", "sweeps")}
    return {"tokens": tokens, "timing": per_token(stamps), "decode_window_s": window, "decode_deltas": delta,
            "bytes_streamed_per_token": delta["bytes_streamed"] / n,
            "achieved_gbps": delta["bytes_streamed"] / window / GB if window > 0 else 0.0,
            "read_s_per_token": delta["read_s"] / n, "compute_s_per_token": delta["compute_s"] / n,
            "stall_s_per_token": delta["stall_s"] / n, "foreign_cpu_load": cpu.foreign_load()}


def streamed_profile(path: Path) -> dict[str, Any]:
    """Pin every decoder layer to disk and the embedding and head to the device (profile overrides)."""
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    return {"version": 1, "overrides": {"tiers": {f"layers.0-{layers - 1}": "disk", "embed": "device",
                                                  "head": "device"}, "prefetch_depth": 2}}


# --------------------------------------------------------------------------- large checkpoints
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def checkpoint_tensors(shape: ModelShape) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, random) of every tensor of a ``shape`` Llama, in file order: embedding,
    head, final norm, then each layer's tensors together, so every unit is one byte range.
    ``random`` False: a norm weight (ones)."""
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d
    out = [("model.embed_tokens.weight", (shape.vocab, h), True), ("lm_head.weight", (shape.vocab, h), True),
           ("model.norm.weight", (h,), False)]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (q, h), True), (p + "self_attn.k_proj.weight", (kv, h), True),
                (p + "self_attn.v_proj.weight", (kv, h), True), (p + "self_attn.o_proj.weight", (h, q), True),
                (p + "mlp.gate_proj.weight", (i, h), True), (p + "mlp.up_proj.weight", (i, h), True),
                (p + "mlp.down_proj.weight", (h, i), True), (p + "input_layernorm.weight", (h,), False),
                (p + "post_attention_layernorm.weight", (h,), False)]
    return out


def build_checkpoint_on(directory: Path, shape: ModelShape, *, device: str = "cpu",
                        config: dict[str, Any] | None = None, seed: int = 0,
                        std: float = 0.02) -> tuple[Path, bool]:
    """Like ``build_checkpoint`` (a random Llama in ``directory``, reused when it is there),
    for checkpoints of many GB: the normal tensors are drawn on ``device`` (a GPU draws 8
    billion in seconds, the CPU takes minutes), model.safetensors is written one tensor at a
    time (peak memory: one tensor, where ``save_file`` holds the model twice), and
    ``config`` entries are merged into config.json (e.g. rope_theta). The values depend on
    the device's generator, so the device type is part of what must match for a reuse.
    The file is fsynced and then dropped from the page cache: later reads come from the disk.
    Returns (dir, reused)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_path, weights, config_path = directory / "bench_meta.json", directory / "model.safetensors", \
        directory / "config.json"
    on = torch.device(device)
    full_config = llama_config(shape) | (config or {})
    meta = {"shape": asdict(shape), "seed": seed, "std": std, "device": on.type, "config": full_config,
            "writer": "build_checkpoint_on"}
    if _reusable(directory, meta):
        return directory, True
    dtype = DTYPES[shape.dtype]
    itemsize = dtype.itemsize
    tensors = checkpoint_tensors(shape)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims, _ in tensors:
        nbytes = math.prod(dims) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)          # the data starts 8-byte aligned, as save_file writes it
    gen = torch.Generator(device=on).manual_seed(seed)
    with open(weights, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, dims, random in tensors:
            if random:
                t = torch.empty(dims, dtype=torch.float32, device=on)
                t.normal_(0.0, std, generator=gen)
                t = t.to(dtype)
            else:
                t = torch.ones(dims, dtype=dtype, device=on)
            f.write(t.cpu().contiguous().view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    config_path.write_text(json.dumps(full_config, indent=2))
    meta_path.write_text(json.dumps(meta))
    return directory, False


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean pages from the page cache (no root needed), so
    that the next buffered read of it comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- GPU memory
class VramMonitor:
    """GPU memory in use as nvidia-smi reports it (the whole GPU: CUDA contexts and other
    processes included), sampled by a background thread every ``interval_s`` (plus the time
    nvidia-smi itself takes) from ``start()`` to ``stop()``. ``net`` figures subtract the
    reading taken at ``start()``. Without nvidia-smi every figure is None and ``error`` says why."""

    def __init__(self, interval_s: float = 0.05, gpu: int = 0) -> None:
        import threading

        self.interval_s, self.gpu = interval_s, gpu
        self.samples_mib: list[float] = []
        self.baseline_mib: float | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vram-monitor", daemon=True)
        self._started = self._stopped = 0.0

    def read_mib(self) -> float | None:
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "-i", str(self.gpu), "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                                 check=True).stdout
            return float(out.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            self.error = f"nvidia-smi: {type(exc).__name__}: {exc}"
            return None

    def _run(self) -> None:
        while not self._done.is_set():
            value = self.read_mib()
            if value is None:
                return
            self.samples_mib.append(value)
            self._done.wait(self.interval_s)

    def start(self) -> "VramMonitor":
        self.baseline_mib = self.read_mib()
        self._started = time.perf_counter()
        if self.baseline_mib is not None:
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self._stopped = time.perf_counter()
        peak = max(self.samples_mib, default=None)
        net = None if peak is None or self.baseline_mib is None else peak - self.baseline_mib
        return {"baseline_bytes": None if self.baseline_mib is None else int(self.baseline_mib * 2**20),
                "peak_bytes": None if peak is None else int(peak * 2**20),
                "net_peak_bytes": None if net is None else int(net * 2**20),
                "samples": len(self.samples_mib),
                "mean_interval_s": (self._stopped - self._started) / len(self.samples_mib) if self.samples_mib else None,
                "error": self.error}


# --------------------------------------------------------------------------- host memory
def peak_rss(reset: bool = False) -> dict[str, Any]:
    """This process's RSS now and its peak (the kernel's high-water mark, VmHWM: no sampling to miss a
    spike); ``reset`` first sets the peak to the RSS now (Linux 4.0+; where refused, "reset_error" says
    why and the peak is the whole process's)."""
    import re

    if reset:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as exc:
            return peak_rss() | {"reset_error": f"{type(exc).__name__}: {exc}"}
    status = Path("/proc/self/status").read_text()
    kib = {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) for k in ("VmRSS", "VmHWM")}
    return {"rss_bytes": kib["VmRSS"] * 1024, "peak_bytes": kib["VmHWM"] * 1024}


def print_table(rows: list[list[str]]) -> None:
    """``rows`` (the first one the heading) as left-aligned columns, a rule under the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------- offload benchmark
def build_transformers_llama(directory: Path, shape: ModelShape, *, seed: int = 0) -> tuple[Path, bool]:
    """A random Llama of ``shape`` made by transformers itself (``LlamaForCausalLM(LlamaConfig)``,
    its own random init) and saved with ``save_pretrained`` as safetensors, once: a later call
    with the same shape and seed reuses it. The files are fsynced and dropped from the page
    cache, so the first reads come from the disk. Returns (dir, reused)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    meta = {"shape": asdict(shape), "seed": seed, "writer": "build_transformers_llama"}
    meta_path = directory / "bench_meta.json"
    if meta_path.exists() and (directory / "config.json").exists() and list(directory.glob("*.safetensors")):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return directory, True
        except ValueError:
            pass
    meta_path.unlink(missing_ok=True)
    torch.manual_seed(seed)
    fields = {k: v for k, v in llama_config(shape).items() if k not in ("architectures", "model_type")}
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**fields)).to(DTYPES[shape.dtype]).eval()
    model.save_pretrained(directory, safe_serialization=True)
    del model
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    meta_path.write_text(json.dumps(meta))
    return directory, False


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what the kernel thinks can be had without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


MEMLOCK_FLAG = Path("/tmp/tierflow-memlock-running")
MEMLOCK_FLOOR_BYTES = int(2.5 * 2**30)

_LOCKER = r"""
import ctypes, json, mmap, os, select, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, 9)                              # PR_SET_PDEATHSIG: SIGKILL when the parent dies
if os.getppid() != int(sys.argv[4]):
    os._exit(1)                               # the parent died before prctl took effect
leave, floor, step, slack = int(sys.argv[1]), int(sys.argv[2]), 128 << 20, int(sys.argv[3])

def available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024

held = []
def lock_one():
    m = mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(step)) != 0:
        return False
    held.append(m)
    return True

def settle():
    # Hold available memory near `leave`: lock more while there is more than leave + slack,
    # and let go while there is less than leave - slack (other work on the machine needs it);
    # never below `floor`.
    global released, relocked
    while available() > max(leave, floor) + slack and lock_one():
        relocked += 1
    while held and available() < max(leave - slack, floor):
        held.pop()                            # unmapped (and unlocked) once no view of it is left
        released += 1

released = relocked = 0
settle()
print(len(held) * step, flush=True)
relocked = 0
low = high = available()
while True:                                   # until the parent closes the pipe (or dies)
    ready, _, _ = select.select([sys.stdin], [], [], 0.25)
    if ready and not sys.stdin.buffer.read1(1 << 16):
        break
    settle()
    now = available()
    low, high = min(low, now), max(high, now)
print(json.dumps({"released_chunks": released, "relocked_chunks": relocked, "chunk_bytes": step,
                  "locked_at_end_bytes": len(held) * step, "available_min_bytes": low,
                  "available_max_bytes": high}), flush=True)
"""


class MemoryLock:
    """Locks RAM away in a helper process (mlock) so that about ``leave_bytes`` stay available,
    for as long as the ``with`` block runs. The helper dies with this process (PR_SET_PDEATHSIG,
    and it exits when its stdin pipe closes). Every 0.25 s it holds available memory within
    ``slack_bytes`` of ``leave_bytes``: when other work takes memory it lets locked memory go,
    when that work ends it locks again; it never takes available memory below
    ``MEMLOCK_FLOOR_BYTES``. While more than 4 GiB are locked, ``MEMLOCK_FLAG`` exists so that
    other work on a shared machine can tell why memory is short."""

    def __init__(self, leave_bytes: int, slack_bytes: int = 256 * 2**20) -> None:
        self.leave_bytes = max(leave_bytes, MEMLOCK_FLOOR_BYTES)
        self.slack_bytes = slack_bytes
        self.helper: dict[str, int] = {}
        self.locked_bytes = 0
        self.available_before = self.available_after = 0
        self._proc: Any = None
        self._flag = False

    def __enter__(self) -> "MemoryLock":
        import subprocess
        import sys

        self.available_before = mem_available_bytes()
        want = max(0, self.available_before - self.leave_bytes)
        if want > 4 * 2**30:
            MEMLOCK_FLAG.touch()
            self._flag = True
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(self.leave_bytes),
                                           str(MEMLOCK_FLOOR_BYTES), str(self.slack_bytes), str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the memory-lock helper exited with {self._proc.wait()} before locking")
            self.locked_bytes = int(line)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.available_after = mem_available_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        import subprocess

        if self._proc is not None:
            self._proc.stdin.close()
            try:
                last = self._proc.stdout.readline()
                if last:
                    self.helper = json.loads(last)
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._flag:
            MEMLOCK_FLAG.unlink(missing_ok=True)
            self._flag = False

    def as_dict(self) -> dict[str, Any]:
        return {"locked_bytes": self.locked_bytes, "available_before_bytes": self.available_before,
                "available_after_bytes": self.available_after, "leave_bytes": self.leave_bytes,
                "slack_bytes": self.slack_bytes, "helper": self.helper}


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def engine_plan_figures(model: Path) -> dict[str, int]:
    """The streamed plan's staging for ``model`` (every decoder layer on disk): slot size and
    count, reader threads and block size, and the bytes it keeps resident."""
    from tierflow import Engine, EngineConfig

    async def go() -> dict[str, int]:
        engine = await Engine.open(model, EngineConfig(device="cpu", dtype="float32", profile=streamed_profile(model)))
        try:
            p = engine.plan
            return {"slot_bytes": p.device_slot_bytes, "num_slots": p.num_slots, "io_threads": p.io_threads,
                    "block_bytes": p.io_block_bytes, "resident_bytes": engine.stats().resident_bytes}
        finally:
            await engine.close()
    return asyncio.run(go())


def write_results(result: dict[str, Any], out: Path, chart: Any, report: Any) -> None:
    """Write ``result`` as JSON to ``out`` and ``chart(result, png)`` beside it, then ``report(result)``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    chart(result, out.with_suffix(".png"))
    report(result)
    print(f"wrote {out} and {out.with_suffix('.png')}")
