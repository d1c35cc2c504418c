"""config.json → ModelSpec for the decoder families: the keys they share, read once, and the
checks that reject what the forward functions cannot run (``UnsupportedModelError``, naming
the field and what is supported)."""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec
from tierflow.adapters.decoder import ACTIVATIONS
from tierflow.adapters.rope import ROPE_TYPES, check_rope, rope_config, rope_kind, rotary_dims
from tierflow.errors import UnsupportedModelError


def config_value(config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    """A config.json value (null included), or the family's transformers default when the key is absent."""
    return config[key] if key in config else defaults.get(key)


def read_spec(config: Mapping[str, Any], family: str, defaults: Mapping[str, Any] | None = None,
              rope_types: tuple[str, ...] = ROPE_TYPES, **features: Any) -> ModelSpec:
    """The ModelSpec fields every decoder family shares, read from config.json (``defaults``:
    the family's transformers defaults for absent or null keys), then the family's
    ``features`` (optional ModelSpec fields, or shared ones the family fixes; ``rope``: a
    (theta, scaling) pair read elsewhere). Checks the result with ``check_spec``."""
    defaults = defaults or {}

    def value(key: str, fallback: Any = None) -> Any:
        found = config.get(key)
        return found if found is not None else defaults.get(key, fallback)

    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        theta, scaling = features.pop("rope", None) or rope_config(config, default_theta=value("rope_theta", 10000.0))
        eos = config.get("eos_token_id")
        shared = dict(
            architecture=config["architectures"][0], hidden_size=hidden,
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

