"""Shared helpers for the benchmarks: a fast random Llama-shape checkpoint, an O_DIRECT disk
bandwidth probe that uses the engine's own reader, and small timing utilities."""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tierflow.tiers.checkpoint import ALIGN_BYTES, ByteRange, UnitLayout
from tierflow.tiers.reader import DiskReader, aligned_empty

GB = 1e9
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


def build_checkpoint(directory: Path, shape: ModelShape, *, seed: int = 0, std: float = 0.02) -> tuple[Path, bool]:
    """Write (or reuse) ``directory``/model.safetensors + config.json. Returns (dir, reused)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "bench_meta.json"
    weights = directory / "model.safetensors"
    meta = {"shape": asdict(shape), "seed": seed, "std": std}
    if meta_path.exists() and weights.exists() and (directory / "config.json").exists():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return directory, True
        except ValueError:
            pass
    meta_path.unlink(missing_ok=True)
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
@dataclass
class DiskProbe:
    path: str
    file_bytes: int
    block_bytes: int
    io_threads: int
    mode: str                       # "direct" | "buffered" | "mixed"
    passes_gbps: list[float]        # one figure per whole-file pass

    @property
    def gbps(self) -> float:        # median of the passes
        return statistics.median(self.passes_gbps)


def whole_file_layout(path: str, buffer_offset: int = 0, start: int = 0, nbytes: int | None = None) -> UnitLayout:
    size = os.path.getsize(path)
    nbytes = size - start if nbytes is None else nbytes
    aligned = -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return UnitLayout(-1, "file", (ByteRange(path, start, aligned, buffer_offset),), (), aligned, nbytes)


async def probe_disk(path: str, *, io_threads: int, block_bytes: int, direct_io: str = "auto",
                     passes: int = 3) -> DiskProbe:
    """O_DIRECT read bandwidth of the whole file with the engine's reader (same block size,
    same thread count = queue depth). The buffer is pre-faulted so page faults are not timed."""
    layout = whole_file_layout(path)
    buffer = aligned_empty(layout.buffer_bytes)
    buffer.fill_(0)
    reader = DiskReader([path], io_threads=io_threads, block_bytes=block_bytes, direct_io=direct_io)
    results = []
    try:
        for _ in range(passes):
            started = time.perf_counter()
            got = await reader.read(layout, buffer)
            results.append(got / (time.perf_counter() - started) / GB)
        modes = set(reader.statistics().modes.values())
    finally:
        reader.close()
    return DiskProbe(path, os.path.getsize(path), block_bytes, io_threads,
                     modes.pop() if len(modes) == 1 else "mixed", results)


async def probe_stream_pattern(layouts: list[UnitLayout], *, io_threads: int, block_bytes: int,
                               in_flight: int, direct_io: str = "auto", sweeps: int = 2) -> float:
    """I/O-only ceiling of the weight stream: the streamed units read in sweep order with
    ``in_flight`` unit reads outstanding (what the slot ring allows), no compute. GB/s."""
    slot = max(layout.buffer_bytes for layout in layouts)
    buffers = [aligned_empty(slot) for _ in range(in_flight)]
    for b in buffers:
        b.fill_(0)
    files = sorted({r.path for layout in layouts for r in layout.ranges})
    reader = DiskReader(files, io_threads=io_threads, block_bytes=block_bytes, direct_io=direct_io)
    sem = asyncio.Semaphore(in_flight)
    free = list(range(in_flight))

    async def one(layout: UnitLayout) -> int:
        async with sem:
            index = free.pop()
            try:
                return await reader.read(layout, buffers[index])
            finally:
                free.append(index)
    try:
        started = time.perf_counter()
        total = sum(await asyncio.gather(*(one(layout) for _ in range(sweeps) for layout in layouts)))
        return total / (time.perf_counter() - started) / GB
    finally:
        reader.close()


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
