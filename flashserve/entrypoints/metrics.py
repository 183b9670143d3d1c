"""Prometheus metrics of the server (prometheus-client), one registry per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flashserve_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("flashserve_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("flashserve_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.e2e = Histogram("flashserve_e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.generated = Counter("flashserve_generation_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("flashserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.running = Gauge("flashserve_num_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("flashserve_num_requests_waiting", "Requests waiting", registry=r)
        self.kv_usage = Gauge("flashserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.kv_blocks_used = Gauge("flashserve_kv_cache_blocks_used", "KV blocks in use", registry=r)
        self.kv_bytes_reserved = Gauge("flashserve_kv_cache_reserved_bytes",
                                       "KV cache bytes reserved at start (virtual until written)", registry=r)
        self.kv_bytes_touched = Gauge("flashserve_kv_cache_touched_bytes",
                                      "KV cache bytes of the blocks ever handed out (estimate of the resident part)",
                                      registry=r)
        self.spec_draft_tokens = Gauge("flashserve_spec_decode_draft_tokens",
                                       "Speculative draft tokens verified since start", registry=r)
        self.spec_accepted_tokens = Gauge("flashserve_spec_decode_accepted_tokens",
                                          "Speculative draft tokens accepted since start", registry=r)
        self.spec_propose_seconds = Gauge("flashserve_spec_decode_proposer_seconds",
                                          "Wall seconds the speculative proposer spent drafting since start",
                                          registry=r)
        self.tokens_sampled = Gauge("flashserve_engine_sampled_tokens",
                                    "Tokens the model sampled since start, those of aborted requests included",
                                    registry=r)
        self.preemptions = Gauge("flashserve_num_preemptions", "Preemptions since start", registry=r)
        self.swapped_out = Gauge("flashserve_num_swapped_out",
                                 "Preemptions that copied the victim's KV blocks to swap space since start",
                                 registry=r)
        self.swap_slots_used = Gauge("flashserve_swap_slots_used", "Swap space slots holding KV blocks", registry=r)
        self.swap_slots_total = Gauge("flashserve_swap_slots_total", "Swap space slots, one KV block each",
                                      registry=r)
        self.prefix_hit_rate = Gauge("flashserve_prefix_cache_hit_rate", "Prefix cache hits / queries (tokens)",
                                     registry=r)

    def observe_finished(self, out) -> None:
        """Called once per finished request with its final RequestOutput."""
        m = out.metrics or {}
        for c in out.outputs:
            self.requests.labels(outcome=c.finish_reason or "unknown").inc()
            self.generated.inc(len(c.token_ids))
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        arrival, first, now = m.get("arrival_time"), m.get("first_token_time"), m.get("now")
        if arrival is not None and now is not None:
            self.e2e.observe(now - arrival)
            if first is not None:
                self.ttft.observe(first - arrival)
                n = max(len(c.token_ids) for c in out.outputs)
                if n > 1:
                    self.tpot.observe((now - first) / (n - 1))

    def observe_outcome(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def refresh(self, stats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_bytes_reserved.set(stats.kv_cache_bytes_reserved)
        self.kv_bytes_touched.set(stats.kv_cache_bytes_touched)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.spec_draft_tokens.set(stats.spec_draft_tokens_total)
        self.spec_accepted_tokens.set(stats.spec_accepted_tokens_total)
        self.spec_propose_seconds.set(stats.spec_propose_seconds_total)
        self.tokens_sampled.set(stats.tokens_sampled_total)
        self.preemptions.set(stats.num_preemptions_total)
        self.swapped_out.set(stats.num_swapped_out_total)
        self.swap_slots_used.set(stats.swap_slots_used)
        self.swap_slots_total.set(stats.swap_slots_total)
