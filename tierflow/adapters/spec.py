"""config.json → ModelSpec for the decoder families: the types of the keys they read, checked
once before any family reads them; the keys they share, read once; and the checks that reject
what the forward functions cannot run (``UnsupportedModelError``, naming the field and what is
supported).

``check_config`` holds every key a family reads to its JSON type (``CONFIG_KEYS``), so the
families can convert with ``int()`` / ``float()`` without meeting a string, a list or a bool:
a wrong type, a count below its minimum, a float with a fraction where an int belongs, or a
null where the families have no default is a ``CheckpointError`` naming the file, the key,
the value and the expected type. An integral float (``4096.0``) counts as an int; a bool never
counts as a number. Upper bounds are generous physical ones that keep later arithmetic finite
and loops short: at most ``MAX_LAYERS`` decoder layers, every other integer at most
``MAX_CONFIG_INT``. Keys no family reads are not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from tierflow.adapters.base import FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec
from tierflow.adapters.decoder import ACTIVATIONS
from tierflow.adapters.rope import ROPE_TYPES, check_rope, rope_config, rope_kind, rotary_dims
from tierflow.errors import CheckpointError, UnsupportedModelError

MAX_LAYERS = 2**16            # decoder layers: today's deepest models have a few hundred
MAX_CONFIG_INT = 2**48        # any other size or count (vocabularies, context lengths, widths)


@dataclass(frozen=True, slots=True)
class Key:
    """The JSON type a config.json key must have; ``nullable``: null means the family's default.

    ``kind``: "int" (``minimum`` to ``maximum``), "number" (finite, >= 0; > 0 if ``positive``,
    <= 1 if ``fraction``), "bool", "string", "object" (a JSON object), "strings" (a list of
    strings), "numbers" (a list of finite numbers), "token_ids" (an int from 0 to
    ``MAX_CONFIG_INT``, or a list of them) and "ints" (a list of such ints)."""

    kind: str
    minimum: int = 0
    nullable: bool = True
    maximum: int = MAX_CONFIG_INT
    positive: bool = False
    fraction: bool = False

    def expected(self) -> str:
        if self.kind == "int":
            top = self.maximum.bit_length() - 1
            return f"an integer from {self.minimum} to {f'2**{top}' if self.maximum == 2**top and top > 20 else self.maximum}"
        if self.kind == "number":
            return f"a finite number {'> 0' if self.positive else '>= 0'}" + (" and <= 1" if self.fraction else "")
        return {"bool": "true or false", "string": "a string", "object": "a JSON object",
                "strings": "a list of strings", "numbers": "a list of finite numbers",
                "token_ids": "a token id (an integer >= 0) or a list of them",
                "ints": "a list of integers >= 0"}[self.kind]


_REQUIRED, _COUNT, _SIZE = Key("int", 1, nullable=False), Key("int", 1), Key("int", 0)
_POSITIVE, _FLAG = Key("number", positive=True), Key("bool")
CONFIG_KEYS: Mapping[str, Key] = {
    "architectures": Key("strings"), "model_type": Key("string"), "torch_dtype": Key("string"),
    "dtype": Key("string"), "hidden_act": Key("string"), "hidden_activation": Key("string"),
    "hidden_size": _REQUIRED, "num_attention_heads": _REQUIRED, "intermediate_size": _REQUIRED,
    "vocab_size": _REQUIRED, "num_hidden_layers": Key("int", 1, nullable=False, maximum=MAX_LAYERS),
    "num_key_value_heads": _COUNT, "head_dim": _COUNT, "max_position_embeddings": _COUNT,
    "original_max_position_embeddings": _COUNT, "sliding_window": _SIZE, "max_window_layers": Key("int", 0, False),
    "sliding_window_pattern": Key("int", 1, False), "decoder_sparse_step": _COUNT,
    "num_local_experts": _COUNT, "num_experts": _COUNT, "num_experts_per_tok": Key("int", 1, False),
    "moe_intermediate_size": Key("int", 1, False), "shared_expert_intermediate_size": _SIZE,
    "rms_norm_eps": Key("number"), "rope_theta": _POSITIVE, "rope_local_base_freq": _POSITIVE,
    "query_pre_attn_scalar": Key("number", nullable=False, positive=True), "final_logit_softcapping": _POSITIVE,
    "attn_logit_softcapping": _POSITIVE, "partial_rotary_factor": Key("number", positive=True, fraction=True),
    "tie_word_embeddings": _FLAG, "attention_bias": _FLAG, "mlp_bias": _FLAG, "use_sliding_window": _FLAG,
    "norm_topk_prob": _FLAG, "qkv_bias": _FLAG, "use_bidirectional_attention": _FLAG,
    "layer_types": Key("strings"), "mlp_only_layers": Key("ints"), "bos_token_id": Key("token_ids"),
    "eos_token_id": Key("token_ids"), "rope_scaling": Key("object"), "rope_parameters": Key("object"),
    "swiglu_limit": _POSITIVE, "swiglu_alpha": _POSITIVE, "quantization_config": Key("object"),
}
# what a rope object (rope_scaling, rope_parameters or one of its per-layer-type entries) may hold
ROPE_KEYS: Mapping[str, Key] = {
    "rope_type": Key("string"), "type": Key("string"), "rope_theta": _POSITIVE, "factor": _POSITIVE,
    "low_freq_factor": _POSITIVE, "high_freq_factor": _POSITIVE, "original_max_position_embeddings": _COUNT,
    "attention_factor": _POSITIVE, "partial_rotary_factor": CONFIG_KEYS["partial_rotary_factor"],
    "short_factor": Key("numbers"), "long_factor": Key("numbers"), "beta_fast": Key("number"),
    "beta_slow": Key("number"), "truncate": _FLAG, "mscale": Key("number"), "mscale_all_dim": Key("number"),
}
_ROPE_NEEDS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"), "yarn": ("factor",)}


def _is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= 1e300 if isinstance(value, int) else math.isfinite(value)   # float() of a larger int overflows


def _fits(key: Key, value: Any) -> bool:
    if key.kind == "int":
        return _is_int(value) and key.minimum <= value <= key.maximum
    if key.kind == "number":
        return _is_number(value) and (value > 0 if key.positive else value >= 0) and (not key.fraction or value <= 1)
    if key.kind in ("ints", "token_ids", "strings", "numbers"):
        if key.kind == "token_ids" and not isinstance(value, list):
            value = [value]
        item = {"strings": lambda v: isinstance(v, str), "numbers": _is_number}.get(
            key.kind, lambda v: _is_int(v) and 0 <= v <= MAX_CONFIG_INT)
        return isinstance(value, list) and all(item(v) for v in value)
    return isinstance(value, {"bool": bool, "string": str, "object": dict}[key.kind])


def _check_keys(doc: Mapping[str, Any], keys: Mapping[str, Key], where: str) -> None:
    for name, key in keys.items():
        if name not in doc or (doc[name] is None and key.nullable):
            continue
        if not _fits(key, doc[name]):
            raise CheckpointError(f"{where}{name} must be {key.expected()}, found {_shown(doc[name])}; fix config.json "
                                  "(or download the checkpoint again)")


def _shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_config(config: Mapping[str, Any], source: str = "config.json") -> None:
    """The JSON types of every key a family reads, and of the rope objects' fields; a
    ``CheckpointError`` naming ``source``, the key, the value and the expected type."""
    _check_keys(config, CONFIG_KEYS, f"{source}: ")
    for name in ("rope_scaling", "rope_parameters"):
        rope = config.get(name)
        if not isinstance(rope, dict):
            continue
        per_type = [t for t in (FULL_ATTENTION, SLIDING_ATTENTION) if t in rope]
        for where, entry in ([(f"{name}.{t}", rope[t]) for t in per_type] if per_type else [(name, rope)]):
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise CheckpointError(f"{source}: {where} must be a JSON object, found {_shown(entry)}")
            _check_keys(entry, ROPE_KEYS, f"{source}: {where}.")
            missing = [k for k in _ROPE_NEEDS.get(rope_kind(entry), ()) if entry.get(k) is None]
            if missing:
                raise CheckpointError(f"{source}: {where} of rope type {rope_kind(entry)!r} lacks {missing}; "
                                      "fix config.json")


def config_value(config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    """A config.json value (null included), or the family's transformers default when the key is absent."""
    return config[key] if key in config else defaults.get(key)


def read_spec(config: Mapping[str, Any], family: str, defaults: Mapping[str, Any] | None = None,
              rope_types: tuple[str, ...] = ROPE_TYPES, *, architecture: str, **features: Any) -> ModelSpec:
    """The ModelSpec fields every decoder family shares, read from config.json (``defaults``:
    the family's transformers defaults for absent or null keys), then the family's
    ``features`` (optional ModelSpec fields, or shared ones the family fixes; ``rope``: a
    (theta, scaling) pair read elsewhere). ``architecture``: the family's class name (the
    adapter was chosen by it, or by ``model_type`` where config.json lists none). Checks the
    result with ``check_spec``; ``config`` has passed ``check_config``."""
    defaults = defaults or {}

    def value(key: str, fallback: Any = None) -> Any:
        found = config.get(key)
        return found if found is not None else defaults.get(key, fallback)

    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        theta, scaling = features.pop("rope", None) or rope_config(config, default_theta=value("rope_theta", 10000.0))
        eos = config.get("eos_token_id")
        shared = dict(
            architecture=architecture, hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(value("num_key_value_heads", heads)),
            head_dim=int(value("head_dim", hidden // heads)),
            intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(value("max_position_embeddings", 2048)),
            rms_norm_eps=float(value("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(value("tie_word_embeddings", False)),
            attention_bias=bool(value("attention_bias", False)), mlp_bias=bool(value("mlp_bias", False)),
            checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)))
        spec = ModelSpec(**(shared | features))
    except KeyError as exc:
        raise UnsupportedModelError(f"config.json lacks the key {exc.args[0]!r} that a {family} config needs") from exc
    check_rope(rope_kind(scaling), rope_types)
    return check_spec(spec)


def check_spec(spec: ModelSpec) -> ModelSpec:
    """Reject what the forward functions cannot run, naming the field."""
    if spec.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{spec.architecture}: hidden activation {spec.hidden_act!r} is not supported; "
                                    f"supported: {sorted(ACTIVATIONS)}")
    if spec.num_heads % spec.num_kv_heads:
        raise UnsupportedModelError(f"{spec.architecture}: {spec.num_heads} attention heads cannot share "
                                    f"{spec.num_kv_heads} key/value heads")
    if rotary_dims(spec) % 2 or not 0 < rotary_dims(spec) <= spec.head_dim:
        raise UnsupportedModelError(f"{spec.architecture}: partial_rotary_factor {spec.partial_rotary_factor} "
                                    f"gives {rotary_dims(spec)} rotary dims of a {spec.head_dim}-dim head; "
                                    "expected an even number between 2 and the head dim")
    if spec.layer_types and len(spec.layer_types) != spec.num_layers:
        raise UnsupportedModelError(f"{spec.architecture}: layer_types lists {len(spec.layer_types)} layers, "
                                    f"num_hidden_layers is {spec.num_layers}")
    unknown = sorted(set(spec.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise UnsupportedModelError(f"{spec.architecture}: layer types {unknown} are not supported; supported: "
                                    f"{FULL_ATTENTION!r}, {SLIDING_ATTENTION!r}")
    if spec.sliding_window is not None and spec.sliding_window < 1:
        raise UnsupportedModelError(f"{spec.architecture}: sliding_window must be >= 1, got {spec.sliding_window}")
    return spec

