"""Frozen configuration records: everything a user sets, validated on construction.

One record per concern. Measured values (bandwidths, placements) never live here:
they belong to the hardware profile and the plan. Every invalid value raises a
``ConfigError`` / ``SamplingError`` naming the field, the value, and what is allowed.

``engine_config_from`` / ``sampling_params_from`` take what the Engine's methods accept in
place of a record: the record itself, a mapping of its fields (an unknown key is an error that
names the closest field), or None (the defaults). Messages show values through ``checks.show``, so a
huge int or a long string cannot make the message itself fail or fill a screen.
"""

from tierflow.config.engine import (DEVICES, DIRECT_IO_MODES, DTYPES, EXPERT_READS, KV_ALLOCATIONS, MOST_TREE_WIDTH,
                                     SPECULATIVE_METHODS, EngineConfig, SpeculativeConfig, engine_config_from)
from tierflow.config.sampling import (MAX_LOGPROBS, MIN_TEMPERATURE, MIN_TOP_P, SEED_RANGE, SamplingParams,
                                       sampling_params_from)

__all__ = ["DEVICES", "DIRECT_IO_MODES", "DTYPES", "EXPERT_READS", "KV_ALLOCATIONS", "MAX_LOGPROBS", "MIN_TEMPERATURE",
           "MIN_TOP_P", "MOST_TREE_WIDTH", "SEED_RANGE", "SPECULATIVE_METHODS", "EngineConfig", "SamplingParams",
           "SpeculativeConfig", "engine_config_from", "sampling_params_from"]
