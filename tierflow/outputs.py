"""What the engine hands back: completions, stream chunks, statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before
    temperature, top-k and top-p), and the ``SamplingParams.logprobs`` most likely tokens at its
    position with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]           # generated tokens (an EOS / stop token included)
    finish_reason: str                   # "stop" | "length"
    prompt_token_ids: tuple[int, ...]
    first_token_s: float                 # time from submission to the first generated token
    total_s: float
    cached_tokens: int = 0               # prompt tokens whose KV came from the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()   # per generated token, when SamplingParams.logprobs is set


@dataclass(frozen=True, slots=True)
class StreamChunk:
    text: str                            # new text since the previous chunk
    token_ids: tuple[int, ...]           # new token ids since the previous chunk
    finish_reason: str | None            # set on the last chunk
    logprobs: tuple[TokenLogprob, ...] = ()   # of token_ids, when SamplingParams.logprobs is set
    prompt_tokens: int = 0               # the request's prompt tokens
    cached_tokens: int = 0               # of those, reused from the prefix cache


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Seconds per decode sweep, by pipeline stage. Measured: ``disk_s`` is the time at least
    one weight read was in flight, ``pcie_s`` the uploads, ``compute_s`` the time the compute
    worker was busy, ``total_s`` the wall time of the sweep. Predicted: the plan's cost model
    for the same sweeps."""

    disk_s: float = 0.0
    pcie_s: float = 0.0
    compute_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SpeculativeStats:
    """Speculative decoding of one method (``EngineConfig.speculative``), since the engine opened.
    A *step* is one request verifying a proposal in one sweep."""

    method: str                          # "ngram"
    proposed_tokens: int = 0             # tokens proposed and verified (candidate-tree alternatives included)
    accepted_tokens: int = 0             # of those, the ones the model agreed with
    steps: int = 0                       # request-sweeps that verified a proposal
    emitted_tokens: int = 0              # tokens those steps appended (accepted ones plus the model's own)
    alternatives_proposed: int = 0       # of the proposed tokens, candidate-tree alternatives (tree_width > 1)
    alternatives_accepted: int = 0       # of the accepted tokens, candidate-tree alternatives

    @property
    def acceptance_rate(self) -> float:
        """The chain's acceptance: its accepted over its proposed tokens, alternatives left out
        (the per-token rate ``tierflow plan --acceptance`` takes; 0.0 before any proposal)."""
        proposed = self.proposed_tokens - self.alternatives_proposed
        return (self.accepted_tokens - self.alternatives_accepted) / proposed if proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a request gained per sweep that verified a proposal (plain decoding: 1)."""
        return self.emitted_tokens / self.steps if self.steps else 0.0


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
    io_mode: str                         # "direct" | "buffered" | "mixed", then "+kvikio-gds" / "+kvikio-compat"
    units_resident: int
    units_streamed: int
    resident_bytes: int
    staging_bytes: int
    decode_sweeps: int = 0               # sweeps in which every sequence decoded one token
    predicted_decode: StageTimes = StageTimes()   # per decode sweep, from the plan's cost model
    measured_decode: StageTimes = StageTimes()    # per decode sweep, measured
    prompt_tokens_cached: int = 0        # prompt tokens reused from the prefix cache (not in prompt_tokens)
    expert_requests: int = 0             # MoE: routed experts asked for (each layer, each sweep)
    expert_hits: int = 0                 # of those, found in the expert cache (or already being read)
    expert_bytes_read: int = 0           # MoE: bytes of routed experts read from disk (in bytes_read_from_disk)
    gpu_busy_s: float | None = None      # CUDA: device time inside the units' kernels (None on CPU)
    gpu_span_s: float | None = None      # CUDA: device time from each sweep's first kernel to its last
    kv_allocation: str = "on_demand"     # "on_demand" (KV taken as tokens arrive, preemption) | "reserve"
    preemptions: int = 0                 # requests preempted because every KV tier was full
    preempted_tokens_recomputed: int = 0 # tokens whose dropped KV was computed again on resumption
    preempted_tokens_restored: int = 0   # tokens whose KV the prefix cache gave back on resumption instead
    speculative: SpeculativeStats | None = None   # proposals and acceptance (None: speculation off)

    @property
    def gpu_idle_fraction(self) -> float | None:
        """CUDA: the fraction of the sweeps' device time the GPU waited (for weights, mostly)."""
        if self.gpu_busy_s is None or not self.gpu_span_s:
            return None
        return max(0.0, 1.0 - self.gpu_busy_s / self.gpu_span_s)

    @property
    def expert_hit_rate(self) -> float:
        return self.expert_hits / self.expert_requests if self.expert_requests else 0.0
