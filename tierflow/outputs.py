"""What the engine hands back: completions, stream chunks, statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]           # generated tokens (an EOS / stop token included)
    finish_reason: str                   # "stop" | "length"
    prompt_token_ids: tuple[int, ...]
    first_token_s: float                 # time from submission to the first generated token
    total_s: float


@dataclass(frozen=True, slots=True)
class StreamChunk:
    text: str                            # new text since the previous chunk
    token_ids: tuple[int, ...]           # new token ids since the previous chunk
    finish_reason: str | None            # set on the last chunk


@dataclass(frozen=True, slots=True)
class EngineStats:
    bytes_read_from_disk: int            # cumulative, resident loading included
    bytes_streamed: int                  # of which by the weight stream during sweeps
    tokens_generated: int
    prompt_tokens: int
    sweeps: int
    read_s: float                        # summed wall time of streamed unit reads (overlapping)
    upload_s: float
    compute_s: float                     # time the compute worker was busy
    stall_s: float                       # time compute waited for weights
    io_mode: str                         # "direct" | "buffered" | "mixed"
    units_resident: int
    units_streamed: int
    resident_bytes: int
    staging_bytes: int
