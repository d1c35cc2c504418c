"""Helpers for tests that users may want too: tiny random checkpoints built locally with
transformers (nothing is downloaded), and a run of the transformers oracle on them."""

from __future__ import annotations

import queue
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

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


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the "
                   "capital of France. Write one sentence about the sea: the sea is wide and deep and blue. "
                   "Name three primary colours: red, yellow and blue. 0 1 2 3 4 5 6 7 8 9, yes; no!")


def build_chat_llama(path: str | Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """``build_random_llama`` with a tokenizer: a small byte-level BPE (trained here on a fixed
    text, so it encodes any string) with a ChatML chat template, whose vocabulary is the
    model's, and ``<|im_end|>`` as the end-of-sequence token. Text prompts, chat messages and
    detokenized output then work as with a real model (the words are random, of course)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    path = build_random_llama(path, vocab_size=len(fast), seed=seed, **kwargs)
    fast.save_pretrained(path)
    config_path = Path(path) / "config.json"
    import json
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = fast.eos_token_id
    config_path.write_text(json.dumps(config, indent=2))
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
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
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
        for name, param in model.named_parameters():
            if param.ndim == 1 or name.endswith("_bias"):      # gpt-oss's stacked expert biases are 2-D
                param.add_(torch.randn_like(param) * (1.0 if name.endswith("sinks") else 0.1))
    model = model.to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes is not None:
        kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(path, **kwargs)
    return path


def layer_copy(source: str | Path, target: str | Path, *, num_layers: int | None = None, extra_layers: int = 0,
               scale: float = 1.0, seed: int = 0) -> Path:
    """A copy of the single-file checkpoint ``source`` with other decoder layers: its first
    ``num_layers`` (a shallow draft of it, for speculative decoding), then ``extra_layers``
    new ones, each a copy of a source layer (in turn) with fresh random matrices whose output
    projections (attention ``o_proj``, MLP ``down_proj`` and experts' down projections) are
    scaled by ``scale``: the copy's residual stream is the source's plus ``scale``-small
    contributions, so ``scale`` sets how far it strays from the source (0: the same logits).
    Embedding, final norm and head are the source's, so both share a vocabulary."""
    import json

    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    have = config["num_hidden_layers"]
    keep = have if num_layers is None else num_layers
    if not 1 <= keep <= have or extra_layers < 0:
        raise ValueError(f"keep 1..{have} of the source's layers and add >= 0, got {num_layers} and {extra_layers}")
    tensors = load_file(source / "model.safetensors")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            layers.setdefault(int(parts[2]), {})[".".join(parts[3:])] = tensor
        else:
            out[name] = tensor
    generator = torch.Generator().manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    for i in range(keep + extra_layers):
        if i < keep:
            layer = layers[i]
        else:
            layer = {}
            for name, tensor in layers[(i - keep) % keep].items():
                if tensor.ndim >= 2:
                    tensor = (torch.randn(tensor.shape, generator=generator) * std).to(tensor.dtype)
                    if "o_proj" in name or "down_proj" in name or name.endswith(("w2.weight",)):
                        tensor = tensor * scale
                layer[name] = tensor.clone()
        for name, tensor in layer.items():
            out[f"model.layers.{i}.{name}"] = tensor.contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = keep + extra_layers
    for key in ("layer_types",):                 # per-layer lists follow the layers
        if isinstance(config.get(key), list):
            config[key] = [config[key][i if i < keep else (i - keep) % keep] for i in range(keep + extra_layers)]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def pack_mxfp4_experts(source: str | Path, target: str | Path) -> Path:
    """A copy of the gpt-oss checkpoint ``source`` with its expert weights packed in MXFP4 as
    the published checkpoints hold them (``*_blocks`` [experts, out, in / 32, 16] and
    ``*_scales``, uint8; biases, attention, router, embedding and head as they were) and
    ``quantization_config`` in its config.json. transformers reads it with
    ``Mxfp4Config(dequantize=True)``, as ``oracle_logits`` does."""
    import json

    from safetensors.torch import load_file, save_file

    from tierflow.adapters.mxfp4 import quantize

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize(tensor.transpose(1, 2))   # [E, out, in]
        else:
            tensors[name] = tensor
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _load_oracle(path: str | Path, dtype: str) -> Any:
    """transformers' model of a checkpoint, fully in memory (MXFP4 experts dequantized)."""
    import json

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    quantization = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)


def oracle_logits(path: str | Path, token_ids: list[int], dtype: str = "float32") -> torch.Tensor:
    """Float32 logits [len(token_ids), vocab] from transformers, fully in memory."""
    model = _load_oracle(path, dtype)
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def oracle_greedy(path: str | Path, token_ids: list[int], max_new_tokens: int, dtype: str = "float32") -> list[int]:
    """Greedy continuation from transformers (no EOS stop)."""
    model = _load_oracle(path, dtype)
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


# -- a simulated CUDA device ---------------------------------------------------------------------
#
# ``SimulatedCuda`` runs the engine's CUDA path on the CPU. Its device tensors are CPU tensors of
# a subclass (``_DeviceTensor``), so the simulation sees every torch call that touches device
# memory, on any thread, and knows which stream the calling thread is using. It models what a GPU
# and PyTorch's caching allocator do and a CPU tensor does not:
#
# - streams run out of order with each other: a copy stream is a thread that lands its copies
#   late; the compute stream's kernels run when enqueued, but with ``compute_lag_s`` an event
#   recorded after them completes that much later, as a GPU finishes after the host has moved on;
# - the legacy default stream (a thread using no stream) is ordered with none of them;
# - every use of a device block is logged with its stream and position in that stream; a write
#   that is not ordered after another stream's use of the same block (by an event the writer's
#   stream waited for, or by that use having completed) is a race, and a block freed while a
#   stream other than the one it was allocated on may still use it — no ``record_stream`` for
#   that stream, no event — is a use-after-free: the caching allocator hands a freed block to the
#   next allocation of its stream at once. The simulation cannot run a kernel late, so instead of
#   reading poisoned values it records each such hazard (``hazards``; ``check()`` raises);
# - a host synchronisation (``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``, a blocking or
#   pageable copy, ``nonzero`` and the calls built on it, ...) on a device tensor is counted
#   (``syncs``, ``count_syncs()``);
# - ``pin`` checks what ``cudaHostRegister`` checks: byte size, alignment, no double
#   registration; a copy between the device and host memory that is not wholly pinned is a sync;
# - an engine thread that blocks on an event before binding the device (``bind_thread``) is recorded when
#   the device index is not 0: CUDA would have made it a context on GPU 0 (``TorchCuda``'s own
#   calls carry a device guard; a thread the engine makes to wait on events binds itself);
# - device memory is accounted: ``memory_reserved()`` / ``max_memory_reserved()``.
#
# Limits: tensors a factory makes outside a compute stream's ``using`` block are host tensors
# (only ``to_device``/``alloc``/``empty`` make device memory there); in the simulation ``.cpu()``
# and ``.to("cpu")`` mean the host, a ``torch.device`` argument means the device.

_SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
                 "masked_select", "unique", "unique_consecutive", "bincount", "argwhere", "nonzero_static"}
_FACTORIES = {"empty", "zeros", "ones", "full", "arange", "linspace", "rand", "randn", "eye", "empty_strided",
              "tensor", "as_tensor", "randint"}
_DATA_FACTORIES = {"tensor", "as_tensor"}
# calls that only make a view (no kernel runs, so no stream does anything)
_VIEWS = {"view", "view_as", "reshape", "__getitem__", "transpose", "t", "permute", "expand", "expand_as", "narrow",
          "select", "unsqueeze", "squeeze", "flatten", "unflatten", "split", "chunk", "unbind", "detach", "as_strided",
          "__get__", "data_ptr", "untyped_storage", "element_size", "numel", "dim", "size", "stride", "is_contiguous",
          "storage_offset", "movedim", "swapaxes", "diagonal", "unfold", "tensor_split", "real", "__len__",
          "__iter__", "__repr__", "__format__", "_make_subclass", "as_subclass", "is_floating_point", "is_pinned"}


class _Block:
    """One device storage: where it was allocated, and its last use by each stream."""
    __slots__ = ("nbytes", "stream", "uses", "recorded", "what")

    def __init__(self, nbytes: int, stream: "SimulatedStream", what: str) -> None:
        self.nbytes, self.stream, self.what = nbytes, stream, what
        self.uses: dict[SimulatedStream, tuple[int, int]] = {}     # stream → (last use, last write)
        self.recorded: set[SimulatedStream] = set()


class SimulatedEvent:
    """An event of ``SimulatedCuda``: completes when its stream reaches it; knows when, and
    which work of which streams it covers."""

    def __init__(self, sim: "SimulatedCuda | None" = None, stream: "SimulatedStream | None" = None,
                 seq: int = 0) -> None:
        self._done = threading.Event()
        self.at = 0.0
        self._sim, self.stream, self.seq = sim, stream, seq
        self.clock: dict[SimulatedStream, int] = dict(stream.clock) if stream is not None else {}
        if stream is not None:
            self.clock[stream] = seq

    def complete(self) -> None:
        if self.stream is not None:
            with self.stream.lock:
                self.stream.completed = max(self.stream.completed, self.seq)
        self.at = time.perf_counter()
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        if self._sim is not None:
            self._sim._touch("event.synchronize")
        self._done.wait()

    def elapsed_time(self, end: "SimulatedEvent") -> float:
        if not (self._done.is_set() and end._done.is_set()):
            raise RuntimeError("elapsed_time of an event that has not completed")
        return (end.at - self.at) * 1e3


class SimulatedStream:
    """A stream of ``SimulatedCuda``: work enqueued from a thread that is not *using* it runs in
    order on the stream's own thread; work from a thread using it (``with ops.using(s)``) runs
    at once in that thread, after the work already queued, as if the kernels had been enqueued
    and completed. ``enqueued`` / ``completed`` count its work; ``clock`` is the position of
    every other stream this one has waited for (through events)."""

    def __init__(self, name: str, sim: "SimulatedCuda | None" = None, *, threaded: bool = True) -> None:
        self.name, self._sim = name, sim
        self.lock = threading.Condition()
        self.enqueued = self.completed = 0
        self.clock: dict[SimulatedStream, int] = {}
        self._queued = 0
        self._queue: Any = queue.SimpleQueue()
        if threaded:
            self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"<stream {self.name}>"

    def _serve(self) -> None:
        if self._sim is not None:
            self._sim._local.stream = self
            self._sim._local.bound = True
        while True:       # a daemon thread: it ends with the process
            seq, work = self._queue.get()
            if self._sim is not None:
                self._sim._local.seq = seq
            try:
                work()
            finally:
                with self.lock:
                    self.completed = max(self.completed, seq)
                    self._queued -= 1
                    self.lock.notify_all()

    def submit(self, work: Any) -> None:
        with self.lock:
            self.enqueued += 1
            self._queued += 1
            seq = self.enqueued
        self._queue.put((seq, work))

    def drain(self) -> None:
        """Wait until the work queued so far has run (work done inline keeps stream order)."""
        with self.lock:
            while self._queued:
                self.lock.wait()

    def step(self, complete: bool) -> int:
        """A position for work done inline; complete at once unless the device lags."""
        with self.lock:
            self.enqueued += 1
            if complete:
                self.completed = self.enqueued
            return self.enqueued


class _DeviceTensor(torch.Tensor):
    """A tensor in a ``SimulatedCuda``'s device memory (each simulation has its own subclass)."""
    _sim: "SimulatedCuda"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return cls._sim._dispatch(cls, func, args, kwargs or {})


class _FactoryMode(torch.overrides.TorchFunctionMode):
    """Active while a thread uses a simulated stream: a factory call that names a device (as
    ``torch.zeros(..., device=q.device)`` does) makes device memory, and a host tensor moved
    with ``.to(device)`` becomes a device copy (a blocking one: counted)."""

    def __init__(self, sim: "SimulatedCuda") -> None:
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sim = self.sim
        if name in _FACTORIES and kwargs.get("device") is not None and getattr(func, "__module__", "") == "torch":
            out = func(*args, **kwargs)
            if name in _DATA_FACTORIES:
                sim._sync(f"torch.{name}(..., device=...): a copy from pageable host memory")
            return sim._adopt(out, f"torch.{name}")
        if name == "to" and args and type(args[0]) is torch.Tensor and _to_device_arg(args[1:], kwargs):
            source = args[0]
            out = func(*args, **kwargs)
            if out is source or out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                out = out.clone()
            if not (kwargs.get("non_blocking") and sim._is_pinned(source)):
                sim._sync("Tensor.to(device) from host memory, blocking or pageable")
            return sim._adopt(out, "Tensor.to")
        return func(*args, **kwargs)


def _to_device_arg(args: Any, kwargs: Any) -> bool:
    """Whether a ``Tensor.to`` call names a ``torch.device`` (the simulated device)."""
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, torch.device)


def _to_host_arg(args: Any, kwargs: Any) -> bool:
    """Whether a ``Tensor.to`` call names the host: the string "cpu"."""
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and target.startswith("cpu")


class SimulatedCuda:
    """The device path's ``DeviceOps`` on the CPU, for tests of the CUDA scheduling without a GPU
    (what it models, and its limits: the comment above this class).

    Copies on a copy stream run on that stream's thread after ``copy_delay_s`` (so a compute that
    does not wait for its upload's event reads stale bytes); waits, records and copies follow
    CUDA's stream order. Events carry completion times, so the device timeline and the GPU idle
    fraction can be checked. With ``compute_lag_s`` an event recorded by a thread using a stream
    completes that much later: a staging slot is then given back through the event bridge, not
    at once, and a block freed or rewritten before the device is done with it is a hazard.
    ``index`` simulates ``cuda:<index>``."""

    kind = "cuda"

    def __init__(self, copy_delay_s: float = 0.0, compute_lag_s: float = 0.0, *, index: int = 0) -> None:
        self.device = torch.device("cpu")
        self.index = index
        self.unbound: set[str] = set()           # threads that touched cuda:<index> without binding it
        self.copy_delay_s, self.compute_lag_s = copy_delay_s, compute_lag_s
        self._local = threading.local()
        self._lock = threading.RLock()
        self._streams: list[SimulatedStream] = []
        self.default_stream = SimulatedStream("simulated-default-stream", self, threaded=False)
        # completes lagging events, in order (the simulation's own: not a stream the engine made)
        self._lag = SimulatedStream("simulated-lag", self) if compute_lag_s else None
        self._tensor = type("_SimulatedDeviceTensor", (_DeviceTensor,), {"_sim": self})
        self._mode = _FactoryMode(self)
        self._blocks: dict[int, _Block] = {}
        self._pins: dict[int, int] = {}          # data pointer → bytes registered
        self.pinned: list[int] = []              # data pointers of the buffers pinned, then unpinned
        self.unpinned: list[int] = []
        self.copies = 0
        self.hazards: list[str] = []
        self.syncs: list[tuple[str, str]] = []   # (thread, what) of every host synchronisation
        self.reserved = self.peak_reserved = 0

    # -- streams and events --------------------------------------------------------------------

    def _current(self) -> SimulatedStream:
        return getattr(self._local, "stream", None) or self.default_stream

    def _inline(self, stream: SimulatedStream) -> bool:
        return getattr(self._local, "stream", None) is stream

    def _run(self, stream: SimulatedStream, work: Any) -> None:
        if self._inline(stream):
            stream.drain()
            work()
        else:
            stream.submit(work)

    def _position(self, stream: SimulatedStream) -> int:
        """The stream position of work the calling thread does now on ``stream``."""
        thread = getattr(stream, "_thread", None)
        if thread is threading.current_thread():          # queued work, running on the stream's thread
            return getattr(self._local, "seq", stream.enqueued)
        if thread is not None:
            stream.drain()                                # inline work comes after what is queued
        return stream.step(complete=stream is self.default_stream or self._lag is None)

    def stream(self) -> SimulatedStream:
        stream = SimulatedStream(f"simulated-stream-{len(self._streams)}", self)
        self._streams.append(stream)
        return stream

    def record(self, stream: SimulatedStream) -> SimulatedEvent:
        if self._inline(stream):
            stream.drain()
            seq = stream.step(complete=self._lag is None)
            event = SimulatedEvent(self, stream, seq)
            if self._lag is not None:
                due = time.perf_counter() + self.compute_lag_s

                def complete_when_due() -> None:
                    time.sleep(max(0.0, due - time.perf_counter()))
                    event.complete()

                self._lag.submit(complete_when_due)
            else:
                event.complete()
            return event
        with stream.lock:
            event = SimulatedEvent(self, stream, stream.enqueued + 1)
            stream.submit(event.complete)
        return event

    def wait(self, stream: SimulatedStream, event: SimulatedEvent) -> None:

        def work() -> None:
            event._done.wait()
            with self._lock:
                for other, seq in event.clock.items():
                    stream.clock[other] = max(stream.clock.get(other, 0), seq)

        self._run(stream, work)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: SimulatedStream) -> None:
        host = src if not isinstance(src, _DeviceTensor) else dst if not isinstance(dst, _DeviceTensor) else None
        if host is not None and not self._is_pinned(host):
            self._sync(f"an asynchronous copy from or to pageable host memory ({host.numel() * host.element_size()} "
                       "bytes): CUDA stages it through a blocking copy")

        def work() -> None:
            if self.copy_delay_s:
                time.sleep(self.copy_delay_s)
            dst.copy_(src, non_blocking=True)
            self.copies += 1

        self._run(stream, work)

    @contextmanager
    def using(self, stream: SimulatedStream) -> Iterator[SimulatedStream]:
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            with self._mode:
                yield stream
        finally:
            self._local.stream = before

    def synchronize(self) -> None:
        # the queued work of every stream runs first (a copy still queued must meet the device as
        # it is, not as if everything had completed), then the lagging events complete
        for stream in self._streams:
            stream.drain()
        if self._lag is not None:
            self._lag.drain()
        for stream in [*self._streams, self.default_stream]:      # everything enqueued has run
            with stream.lock:
                stream.completed = stream.enqueued

    def bind_thread(self) -> None:
        """Make this simulated device the calling thread's current device."""
        self._local.bound = True

    def _touch(self, what: str) -> None:
        """An engine thread ("tierflow-...") blocks on the device: it must have bound it. (Other
        threads — the caller's — reach the device only through guarded calls.)"""
        thread = threading.current_thread().name
        if self.index and thread.startswith("tierflow") and not getattr(self._local, "bound", False):
            self.unbound.add(thread)

    # -- memory --------------------------------------------------------------------------------

    def empty(self, nbytes: int) -> torch.Tensor:
        # not zeros: stale bytes must show
        return self._adopt(torch.full((nbytes,), 0xAB, dtype=torch.uint8), "empty")

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype)
        if t.is_floating_point():
            t.fill_(float("nan"))           # uninitialised device memory: never zeros
        return self._adopt(t, "alloc")

    def to_device(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        """A device copy of host ``tensor`` on the calling thread's stream (the legacy default
        stream when it uses none): complete when this returns, or with ``non_blocking`` (from
        pinned memory only) in that stream's order."""
        if isinstance(tensor, _DeviceTensor):
            raise AssertionError("to_device() of a tensor already on the simulated device")
        if not non_blocking:
            self._sync("to_device(): a blocking copy from the host")
        elif not self._is_pinned(tensor):
            self._sync("to_device(non_blocking=True) from pageable host memory")
        stream = self._current()
        if getattr(stream, "_thread", None) is not None:
            stream.drain()
        copy = self._adopt(tensor.detach().clone(), "to_device")
        self._use(copy, True, "to_device")
        return copy

    def record_stream(self, tensor: torch.Tensor, stream: SimulatedStream) -> None:
        block = self._block(tensor)
        if block is None:
            raise AssertionError("record_stream() of a tensor that is not in device memory")
        block.recorded.add(stream)

    def memory_reserved(self) -> int:
        return self.reserved

    def max_memory_reserved(self) -> int:
        return self.peak_reserved

    def reset_peak_memory(self) -> None:
        self.peak_reserved = self.reserved

    def _adopt(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor``'s memory becomes device memory, allocated on the calling thread's stream."""
        with torch._C.DisableTorchFunctionSubclass():
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and ptr not in self._blocks:
            with self._lock:
                self._blocks[ptr] = _Block(nbytes, self._current(), what)
                self.reserved += nbytes
                self.peak_reserved = max(self.peak_reserved, self.reserved)
            weakref.finalize(storage, self._freed, ptr)
        return tensor if isinstance(tensor, self._tensor) else tensor.as_subclass(self._tensor)

    def _block(self, tensor: torch.Tensor) -> _Block | None:
        with torch._C.DisableTorchFunctionSubclass():
            return self._blocks.get(tensor.untyped_storage().data_ptr())

    def _freed(self, ptr: int) -> None:
        with self._lock:
            block = self._blocks.pop(ptr, None)
            if block is None:
                return
            self.reserved -= block.nbytes
            for stream, (seq, _) in block.uses.items():
                if stream is block.stream or stream in block.recorded or self._ordered(stream, seq, block.stream):
                    continue
                self.hazards.append(
                    f"use after free: a device block of {block.nbytes} bytes ({block.what}, allocated on "
                    f"{block.stream.name}) was freed while {stream.name} had not finished using it (position {seq}, "
                    f"done {stream.completed}); without record_stream or an event the caching allocator gives it "
                    f"to the next allocation on {block.stream.name} at once")

    @staticmethod
    def _ordered(other: SimulatedStream, seq: int, stream: SimulatedStream) -> bool:
        """Whether ``other``'s work up to ``seq`` is done, or ``stream`` waited for it."""
        return other.completed >= seq or stream.clock.get(other, 0) >= seq

    def _use(self, tensor: torch.Tensor, wrote: bool, what: str, seq: int | None = None) -> None:
        block = self._block(tensor)
        if block is None:
            return
        stream = self._current()
        seq = self._position(stream) if seq is None else seq
        with self._lock:
            for other, (used, written) in block.uses.items():
                last = used if wrote else written          # a write conflicts with any use, a read with a write
                if other is stream or not last or self._ordered(other, last, stream):
                    continue
                self.hazards.append(
                    f"race: {what} on {stream.name} {'writes' if wrote else 'reads'} a device block ({block.what}, "
                    f"{block.nbytes} bytes) that {other.name} {'used' if wrote else 'wrote'} at position {last} "
                    f"(done {other.completed}), with no event ordering the two")
            written = seq if wrote else block.uses.get(stream, (0, 0))[1]
            block.uses[stream] = (seq, written)

    # -- pinned memory -------------------------------------------------------------------------

    def pin(self, buffer: torch.Tensor) -> None:
        from tierflow.pipeline.device import pinned_range

        ptr, nbytes = pinned_range(buffer)
        if not nbytes:                   # nothing to register (TorchCuda makes no call)
            self.pinned.append(ptr)
            return
        if ptr % 4096:
            raise AssertionError(f"cudaHostRegister of {nbytes} bytes at {ptr:#x}: not page-aligned")
        for start, size in self._pins.items():
            if start < ptr + nbytes and ptr < start + size:
                raise AssertionError(f"cudaHostRegister of {ptr:#x}..{ptr + nbytes:#x}: overlaps a registered range "
                                     "(cudaErrorHostMemoryAlreadyRegistered)")
        self._pins[ptr] = nbytes
        self.pinned.append(ptr)

    def unpin(self, buffer: torch.Tensor) -> None:
        ptr = buffer.data_ptr()
        if not buffer.numel():
            self.unpinned.append(ptr)
            return
        if self._pins.pop(ptr, None) is None:
            raise AssertionError(f"cudaHostUnregister of {ptr:#x}: not registered")
        self.unpinned.append(ptr)

    def _is_pinned(self, tensor: torch.Tensor) -> bool:
        with torch._C.DisableTorchFunctionSubclass():
            ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        return any(start <= ptr and ptr + nbytes <= start + size for start, size in self._pins.items())

    # -- host synchronisation ------------------------------------------------------------------

    def _sync(self, what: str) -> None:
        with self._lock:
            self.syncs.append((threading.current_thread().name, what))

    @contextmanager
    def count_syncs(self) -> Iterator[list[tuple[str, str]]]:
        """The host synchronisations made inside the block: (thread, what) each."""
        first = len(self.syncs)
        found: list[tuple[str, str]] = []
        try:
            yield found
        finally:
            found.extend(self.syncs[first:])

    def check(self) -> None:
        """Raise AssertionError if the run had a hazard or touched the device from an unbound thread."""
        problems = list(self.hazards) + [f"thread {name} touched cuda:{self.index} without binding it: CUDA makes "
                                         "it a context on GPU 0" for name in sorted(self.unbound)]
        if problems:
            raise AssertionError(f"{len(problems)} device hazard(s):\n" + "\n".join(problems[:20]))

    # -- the torch calls on device tensors -----------------------------------------------------

    def _dispatch(self, cls: type, func: Any, args: Any, kwargs: Any) -> Any:
        name = getattr(func, "__name__", "")
        tensors = [t for t in _flatten((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = [t for t in tensors if isinstance(t, cls)]
        reason = self._sync_reason(name, func, args, kwargs, cls)
        if reason and not hasattr(self._local, "seq"):   # a stream's own work was counted when enqueued
            self._sync(reason)
        written = _written(name, args, kwargs)
        kernel = name not in _VIEWS or reason is not None
        # a kernel runs in its stream's order: after the work already queued on it
        seq = self._position(self._current()) if kernel and device else 0
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if seq:
            for t in device:
                self._use(t, any(t is w for w in written), name, seq)
        if name in ("cpu", "numpy") or (name == "to" and _to_host_arg(args[1:], kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return out.clone() if isinstance(out, torch.Tensor) else out     # a host copy, not an alias
        if written and out is written[0]:
            return out                         # an in-place call returns its (unconverted) target
        with torch._C.DisableTorchFunctionSubclass():
            host = {t.untyped_storage().data_ptr() for t in tensors if not isinstance(t, cls)}
        return self._wrap(out, cls, host)

    def _wrap(self, out: Any, cls: type, host: set[int]) -> Any:
        if isinstance(out, torch.Tensor):
            if isinstance(out, cls) or type(out) is not torch.Tensor:
                return out
            with torch._C.DisableTorchFunctionSubclass():
                if out.untyped_storage().data_ptr() in host:      # an alias of a host input stays a host tensor
                    return out
            return self._adopt(out, "result")
        if isinstance(out, (tuple, list)):
            return type(out)([self._wrap(o, cls, host) for o in out])
        return out

    def _sync_reason(self, name: str, func: Any, args: Any, kwargs: Any, cls: type) -> str | None:
        target = args[0] if args else None
        on_device = isinstance(target, cls)
        if name in _SYNC_METHODS and on_device:
            return f"Tensor.{name}() of a device tensor"
        if name == "where" and len(args) + len(kwargs) == 1:
            return "torch.where(condition): nonzero"
        if name == "to" and on_device and _to_host_arg(args[1:], kwargs):
            return "Tensor.to('cpu') of a device tensor"
        if name == "repeat_interleave" and "output_size" not in kwargs and \
                any(isinstance(a, cls) for a in args[1:2]):
            return "repeat_interleave without output_size"
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and on_device and len(args) > 1:
            for index in _flatten(args[1]):
                if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                    return f"{name} with a boolean mask: nonzero"
                if isinstance(index, torch.Tensor) and not isinstance(index, cls) and index.dim() > 0:
                    return f"{name} with a host index tensor: a blocking copy"
        if name == "copy_" and len(args) > 1:
            dst, src = args[0], args[1]
            if isinstance(dst, cls) != isinstance(src, cls):
                host = src if isinstance(dst, cls) else dst
                if not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
                    return "a blocking copy between the device and the host"
                if not self._is_pinned(host):
                    return "an asynchronous copy from or to pageable host memory"
        return None


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def _written(name: str, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors a torch call writes: an in-place method's target, ``out=``."""
    written = []
    if args and isinstance(args[0], torch.Tensor) and (name == "__setitem__" or
                                                       (name.endswith("_") and not name.startswith("__")) or
                                                       name.startswith("__i")):
        written.append(args[0])
    out = kwargs.get("out")
    written.extend(t for t in _flatten(out) if isinstance(t, torch.Tensor))
    return written
