"""Helpers for tests that users may want too: tiny random checkpoints built locally with
transformers (nothing is downloaded), and a run of the transformers oracle on them.

Also the smallest device budget that makes a checkpoint stream (``streaming_budget``) and
``SimulatedCuda``, the engine's CUDA path on the CPU.

``tierflow.testing`` is a package of its own at the root, at the rank of the public surface,
rather than a thin module over code placed in the layers below: each helper needs things from
several layers at once (the checkpoint builders the MXFP4 packer of ``adapters``,
``streaming_budget`` the engine's planning and ``config``, ``SimulatedCuda`` the pinned ranges
of ``pipeline``), and none of it is runtime code that a layer of the engine should hold -- a
simulated device in ``pipeline`` would sit beside the real one as if the engine could pick it.
So the helpers stay together in the one layer allowed to import all of these, one job a module:

- ``checkpoints``: random checkpoints of every family, and checkpoints derived from one;
- ``oracle``: transformers' logits and greedy tokens for a checkpoint, and the checks of a run's
  logits and greedy tokens against them;
- ``budget``: ``streaming_budget``;
- ``simulated_cuda`` (the device), ``simulated_streams``, ``simulated_memory`` and
  ``simulated_torch``: ``SimulatedCuda`` and its parts.
"""

from __future__ import annotations

from tierflow.testing.budget import streaming_budget
from tierflow.testing.checkpoints import (CHAT_TEMPLATE, FAMILY_CLASSES, build_chat_llama, build_random_checkpoint,
                                          build_random_llama, layer_copy, pack_mxfp4_experts)
from tierflow.testing.oracle import check_greedy_tokens, check_logit_rows, oracle_greedy, oracle_logits
from tierflow.testing.simulated_cuda import SimulatedCuda
from tierflow.testing.simulated_streams import SimulatedEvent, SimulatedStream

__all__ = ["CHAT_TEMPLATE", "FAMILY_CLASSES", "SimulatedCuda", "SimulatedEvent", "SimulatedStream", "build_chat_llama",
           "build_random_checkpoint", "build_random_llama", "check_greedy_tokens", "check_logit_rows", "layer_copy",
           "oracle_greedy", "oracle_logits", "pack_mxfp4_experts", "streaming_budget"]
