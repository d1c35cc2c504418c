"""Helpers for tests that users may want too: tiny random checkpoints built locally with
transformers (nothing is downloaded), and a run of the transformers oracle on them."""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


def build_random_llama(path: str | Path, *, hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4,
                       num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int = 512,
                       tie_word_embeddings: bool = False, dtype: str = "float32", max_shard_bytes: int | None = None,
                       rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 4096,
                       initializer_range: float = 0.1, seed: int = 0, **extra: Any) -> Path:
    """Write a random ``LlamaForCausalLM`` checkpoint (config.json + safetensors, sharded with an
    index json when ``max_shard_bytes`` is given). A larger-than-default initializer range
    makes logits peaked, so greedy tokens are a meaningful comparison."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    config = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                         vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                         max_position_embeddings=max_position_embeddings, rope_scaling=rope_scaling,
                         initializer_range=initializer_range, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, **extra)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes is not None:
        kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(path, **kwargs)
    return path


# family -> (transformers config class, model class) for ``build_random_checkpoint``
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def build_random_checkpoint(path: str | Path, family: str, *, hidden_size: int = 64, num_layers: int = 3,
                            num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                            vocab_size: int = 512, dtype: str = "float32", max_shard_bytes: int | None = None,
                            max_position_embeddings: int = 4096, initializer_range: float = 0.1, seed: int = 0,
                            **config: Any) -> Path:
    """Write a random checkpoint of ``family`` (a key of ``FAMILY_CLASSES``) with its
    transformers classes: config.json + safetensors, sharded with an index json when
    ``max_shard_bytes`` is given. ``config`` goes to the family's config class as is (window,
    soft-caps, rope parameters, ...). Norm weights and biases, which transformers initialises
    to constants, get random values too, so a wrong norm formula or a dropped bias shows in
    the logits; the larger-than-default initializer range makes greedy tokens meaningful."""
    import transformers

    if family not in FAMILY_CLASSES:
        raise ValueError(f"family must be one of {sorted(FAMILY_CLASSES)}, got {family!r}")
    config_name, model_name = FAMILY_CLASSES[family]
    path = Path(path)
    cfg = getattr(transformers, config_name)(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model = model.to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes is not None:
        kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(path, **kwargs)
    return path


def oracle_logits(path: str | Path, token_ids: list[int], dtype: str = "float32") -> torch.Tensor:
    """Float32 logits [len(token_ids), vocab] from transformers, fully in memory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def oracle_greedy(path: str | Path, token_ids: list[int], max_new_tokens: int, dtype: str = "float32") -> list[int]:
    """Greedy continuation from transformers (no EOS stop)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    with torch.inference_mode():
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(token_ids):].tolist()


def streaming_budget(path: str | Path, config: Any = None) -> int:
    """The smallest device budget that runs ``path`` — at that budget the decoder layers
    stream from disk on every sweep (the embedding and head may stay resident when that is
    what makes it smallest). Pass the EngineConfig you will use: its other fields size the
    staging slots and reservations."""
    from dataclasses import replace

    from tierflow.config import EngineConfig
    from tierflow.engine.loading import resolve_device, resolve_dtype
    from tierflow.engine.planning import engine_overrides, engine_workload, index_costs, load_engine_profile
    from tierflow.tiers.checkpoint.index import CheckpointIndex
    from tierflow.tiers.plan.planner import minimum_device_bytes
    from tierflow.tiers.plan.hardware import HardwareProfile

    config = config or EngineConfig(device="cpu")
    index = CheckpointIndex.open(path)
    dtype = resolve_dtype(config.dtype, index.spec.checkpoint_dtype, resolve_device(config.device))
    # Which placements fit depends on sizes only, so any bandwidths do.
    unlimited = HardwareProfile(device="cpu", device_memory_bytes=2**60, host_memory_bytes=2**60, disk_read_gbps=1.0,
                                decode_gbps=1.0, prefill_tflops=1.0)
    overrides = replace(engine_overrides(config, load_engine_profile(config)), device_memory_bytes=None)
    return minimum_device_bytes(index_costs(index, dtype), unlimited, engine_workload(config), overrides)


class SimulatedEvent:
    """An event of ``SimulatedCuda``: completes when its stream reaches it; knows when."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.at = 0.0

    def complete(self) -> None:
        self.at = time.perf_counter()
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()

    def elapsed_time(self, end: "SimulatedEvent") -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time of an event that has not completed")
        return (end.at - self.at) * 1e3


class SimulatedStream:
    """A stream of ``SimulatedCuda``: work enqueued from a thread that is not *using* it runs in
    order on the stream's own thread; work from a thread using it (``with ops.using(s)``) runs
    at once in that thread, as if the kernels had been enqueued and completed."""

    def __init__(self, name: str) -> None:
        self._queue: Any = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:       # a daemon thread: it ends with the process
            self._queue.get()()

    def submit(self, work: Any) -> None:
        self._queue.put(work)


class SimulatedCuda:
    """The device path's ``DeviceOps`` on the CPU, for tests of the CUDA scheduling without a GPU.

    Device tensors are CPU tensors in buffers of their own; copies on a copy stream run on that
    stream's thread after ``copy_delay_s`` (so a compute that does not wait for its upload's
    event reads stale bytes); waits, records and copies follow CUDA's stream order. Events
    carry completion times, so the device timeline and the GPU idle fraction can be checked.
    With ``compute_lag_s`` an event recorded by a thread using a stream completes that much
    later, as the device finishes kernels after the host has enqueued them: a staging slot is
    then given back through the event bridge, not at once."""

    kind = "cuda"

    def __init__(self, copy_delay_s: float = 0.0, compute_lag_s: float = 0.0) -> None:
        self.device = torch.device("cpu")
        self.copy_delay_s, self.compute_lag_s = copy_delay_s, compute_lag_s
        self._local = threading.local()
        self._streams: list[SimulatedStream] = []
        self._lag = self.stream() if compute_lag_s else None      # completes lagging events, in order
        self.pinned: list[int] = []              # data pointers of the buffers pinned, then unpinned
        self.unpinned: list[int] = []
        self.copies = 0

    def _inline(self, stream: SimulatedStream) -> bool:
        return getattr(self._local, "stream", None) is stream

    def _run(self, stream: SimulatedStream, work: Any) -> None:
        if self._inline(stream):
            work()
        else:
            stream.submit(work)

    def stream(self) -> SimulatedStream:
        stream = SimulatedStream(f"simulated-stream-{len(self._streams)}")
        self._streams.append(stream)
        return stream

    def record(self, stream: SimulatedStream) -> SimulatedEvent:
        event = SimulatedEvent()
        if self._lag is not None and self._inline(stream):
            due = time.perf_counter() + self.compute_lag_s

            def complete_when_due() -> None:
                time.sleep(max(0.0, due - time.perf_counter()))
                event.complete()

            self._lag.submit(complete_when_due)
        else:
            self._run(stream, event.complete)
        return event

    def wait(self, stream: SimulatedStream, event: SimulatedEvent) -> None:
        self._run(stream, event.synchronize)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: SimulatedStream) -> None:
        def work() -> None:
            if self.copy_delay_s:
                time.sleep(self.copy_delay_s)
            dst.copy_(src)
            self.copies += 1

        self._run(stream, work)

    @contextmanager
    def using(self, stream: SimulatedStream) -> Iterator[SimulatedStream]:
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield stream
        finally:
            self._local.stream = before

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)     # not zeros: stale bytes must show

    def pin(self, buffer: torch.Tensor) -> None:
        self.pinned.append(buffer.data_ptr())

    def unpin(self, buffer: torch.Tensor) -> None:
        self.unpinned.append(buffer.data_ptr())

    def synchronize(self) -> None:
        for stream in self._streams:
            done = SimulatedEvent()
            stream.submit(done.complete)
            done.synchronize()
