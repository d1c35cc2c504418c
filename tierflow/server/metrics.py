"""``GET /metrics``: the server's and the engine's figures in the Prometheus text format.

The server counts what it sees per request (outcomes, tokens, time to first token, time per
output token); the engine's own figures (sweeps and their seconds, bytes read from disk, KV
blocks per tier, prefix-cache hits, live and waiting requests) are read from
``Engine.stats()`` and ``Engine.pipeline_statistics()`` at each scrape, by a collector, so
they are never stale and cost nothing between scrapes. Each application has its own registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tierflow.server.state import State

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, state: "State") -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tierflow_requests", "Completion requests by endpoint and outcome",
                                ("endpoint", "outcome"), registry=registry)
        self.prompt_tokens = Counter("tierflow_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generated_tokens = Counter("tierflow_generation_tokens", "Tokens generated (streamed or not)",
                                        registry=registry)
        self.first_token = Histogram("tierflow_time_to_first_token_seconds",
                                     "From the request's arrival to its first generated token",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.per_token = Histogram("tierflow_time_per_output_token_seconds",
                                   "Per generated token after the first, per request",
                                   buckets=LATENCY_BUCKETS, registry=registry)
        self.request_seconds = Histogram("tierflow_request_seconds", "Whole requests, arrival to last token",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(_EngineCollector(state))

    def finished(self, endpoint: str, outcome: str, *, generated: int = 0, first_token_s: float | None = None,
                 total_s: float | None = None, prompt_tokens: int | None = None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.generated_tokens.inc(generated)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if first_token_s is not None:
            self.first_token.observe(first_token_s)
            if total_s is not None and generated > 1:
                self.per_token.observe((total_s - first_token_s) / (generated - 1))
        if total_s is not None and outcome == "ok":
            self.request_seconds.observe(total_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, state: "State") -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.state
        live = GaugeMetricFamily("tierflow_live_requests", "HTTP completion requests in flight")
        live.add_metric([], state.live)
        yield live
        queue = GaugeMetricFamily("tierflow_queue_length", "Requests waiting for the engine to admit them")
        engine = state.engine
        if engine is None or engine.closed:
            queue.add_metric([], 0)
            yield queue
            return
        stats, pipeline = engine.stats(), engine.pipeline_statistics()
        queue.add_metric([], pipeline.batcher.num_waiting)
        yield queue
        running = GaugeMetricFamily("tierflow_running_sequences", "Sequences the engine's sweeps serve now")
        running.add_metric([], pipeline.batcher.num_running)
        yield running
        counters = [
            ("tierflow_sweeps", "Weight sweeps (forward passes over the model)", stats.sweeps),
            ("tierflow_decode_sweeps", "Sweeps in which every sequence decoded one token", stats.decode_sweeps),
            ("tierflow_sweep_seconds", "Wall time of decode sweeps", stats.measured_decode.total_s),
            ("tierflow_disk_read_bytes", "Bytes read from disk (weights, resident loading included)",
             stats.bytes_read_from_disk),
            ("tierflow_streamed_bytes", "Weight bytes streamed during sweeps", stats.bytes_streamed),
            ("tierflow_engine_generated_tokens", "Tokens the engine generated", stats.tokens_generated),
            ("tierflow_engine_prompt_tokens", "Prompt tokens the engine prefilled", stats.prompt_tokens),
            ("tierflow_preemptions", "Requests preempted because every KV tier was full", stats.preemptions),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        if pipeline.kv_blocks is not None:
            used = GaugeMetricFamily("tierflow_kv_blocks_used", "KV block slots in use, per tier", labels=["tier"])
            capacity = GaugeMetricFamily("tierflow_kv_blocks_capacity", "KV block slots, per tier", labels=["tier"])
            for tier, pool in pipeline.kv_blocks.by_tier().items():
                used.add_metric([tier], pool.used)
                capacity.add_metric([tier], pool.capacity)
            yield used
            yield capacity
        prefix = pipeline.prefix_cache
        if prefix is not None:
            hits = CounterMetricFamily("tierflow_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache")
            hits.add_metric([], prefix.hit_tokens)
            yield hits
            lookups = CounterMetricFamily("tierflow_prefix_cache_lookups", "Requests that looked for a cached prefix")
            lookups.add_metric([], prefix.lookups)
            yield lookups
