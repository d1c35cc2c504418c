"""tierflow: run language models larger than your GPU or RAM by streaming layers from disk
through an asyncio pipeline that overlaps every transfer with compute."""

from __future__ import annotations

from tierflow.config import EngineConfig, SamplingParams, SpeculativeConfig
from tierflow.engine.api import Engine
from tierflow.errors import (CheckpointError, ClosedResourceError, ConfigError, DemoModelMissingError, EngineClosedError,
                             EventLoopError,
                             FlashAttnUnavailableError, KVCapacityError, KVCorruptionError, NonFiniteRow,
                             PinnedMemoryError,
                             ProfileError, PromptError, RequestError, RequestTimeoutError, SamplingError,
                             ShapeMismatchError, TierCapacityError, TierflowError, TransferError, UnsupportedModelError,
                             UnsupportedRequestError, WouldBlock)
from tierflow.outputs import Completion, EngineStats, StreamChunk, TokenLogprob
from tierflow.engine.sync import SyncEngine

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ClosedResourceError", "Completion", "ConfigError", "DemoModelMissingError", "Engine",
           "EngineClosedError", "EngineConfig", "EventLoopError", "EngineStats", "FlashAttnUnavailableError", "KVCapacityError",
           "KVCorruptionError", "NonFiniteRow", "PinnedMemoryError", "ProfileError", "PromptError", "RequestError",
           "RequestTimeoutError", "SamplingError", "SamplingParams", "ShapeMismatchError", "SpeculativeConfig", "StreamChunk", "SyncEngine",
           "TierCapacityError", "TierflowError", "TokenLogprob", "TransferError", "UnsupportedModelError", "UnsupportedRequestError", "WouldBlock"]
