"""Prometheus metrics for one server (its own registry: no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.requests = counter("radixserve_requests", "Finished requests")
        self.prompt_tokens = counter("radixserve_prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("radixserve_generation_tokens", "Generated tokens")
        self.cached_tokens = counter("radixserve_cached_tokens", "Prompt tokens served from the radix cache")
        self.ttft = histogram("radixserve_time_to_first_token_seconds", "Time to first token")
        self.tpot = histogram("radixserve_time_per_output_token_seconds", "Time per output token after the first")
        self.e2e = histogram("radixserve_e2e_request_latency_seconds", "End-to-end request latency")
        self.running = gauge("radixserve_num_running_reqs", "Running requests")
        self.waiting = gauge("radixserve_num_queue_reqs", "Waiting requests")
        self.kv_usage = gauge("radixserve_token_usage", "Fraction of KV slots in use")
        self.hit_rate = gauge("radixserve_cache_hit_rate", "Radix cache hit rate (prompt tokens)")
        self.spec_accept_length = gauge("radixserve_spec_accept_length",
                                        "Speculative decoding: tokens per verify step (accepted guesses + 1)")
        self.spec_verify_steps = gauge("radixserve_spec_verify_steps", "Speculative decoding: verify steps so far")
        self.spec_accepted_tokens = gauge("radixserve_spec_accepted_tokens",
                                          "Speculative decoding: accepted guesses so far")

    def observe_finished(self, meta: dict[str, Any], ttft: float | None) -> None:
        m = self.model_name
        self.requests.labels(m).inc()
        self.prompt_tokens.labels(m).inc(meta["prompt_tokens"])
        self.generation_tokens.labels(m).inc(meta["completion_tokens"])
        self.cached_tokens.labels(m).inc(meta["cached_tokens"])
        self.e2e.labels(m).observe(meta["e2e_latency"])
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
            if meta["completion_tokens"] > 1:
                self.tpot.labels(m).observe((meta["e2e_latency"] - ttft) / (meta["completion_tokens"] - 1))

    def update_state(self, state: dict[str, Any]) -> None:
        m = self.model_name
        self.running.labels(m).set(state["running_requests"])
        self.waiting.labels(m).set(state["waiting_requests"])
        self.kv_usage.labels(m).set(state["kv_used_tokens"] / max(1, state["kv_capacity_tokens"]))
        self.hit_rate.labels(m).set(state["cache_hit_rate"])
        self.spec_accept_length.labels(m).set(state["avg_spec_accept_length"])
        self.spec_verify_steps.labels(m).set(state["spec_verify_steps"])
        self.spec_accepted_tokens.labels(m).set(state["spec_accepted_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
