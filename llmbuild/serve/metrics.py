"""Prometheus metrics of one server (its own registry, so several apps can live in one
process, as in the tests): requests, tokens in/out, queue depth, slot occupancy, time
to first token and inter-token latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine, *, capacity: int):
        self.registry = r = CollectorRegistry()
        scheduler = engine.scheduler
        self.requests = Counter("llmbuild_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llmbuild_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generation_tokens = Counter("llmbuild_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("llmbuild_generations", "Generations finished, by finish reason", ["reason"],
                                registry=r)
        self.in_flight = Gauge("llmbuild_sequences_in_flight", "Sequences admitted by the server and not finished",
                               registry=r)
        Gauge("llmbuild_sequences_capacity", "Sequences the server admits at once (slots + queue)",
              registry=r).set(capacity)
        Gauge("llmbuild_queue_depth", "Sequences waiting for a slot", registry=r).set_function(
            lambda: len(scheduler.waiting) + len(engine._incoming))
        Gauge("llmbuild_slots_busy", "KV-cache slots holding a sequence", registry=r).set_function(
            lambda: sum(s is not None for s in scheduler.slots))
        Gauge("llmbuild_slots_total", "KV-cache slots", registry=r).set(scheduler.num_slots)
        self.ttft = Histogram("llmbuild_time_to_first_token_seconds", "Submission to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmbuild_inter_token_latency_seconds", "Time between two output tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe(self, generation) -> None:
        self.prompt_tokens.inc(len(generation.prompt_token_ids))
        self.generation_tokens.inc(len(generation.token_ids))
        self.finished.labels(generation.finish_reason or "unknown").inc()
        if generation.time_to_first_token is not None:
            self.ttft.observe(generation.time_to_first_token)
        times = generation.token_times
        for a, b in zip(times, times[1:]):
            self.itl.observe(b - a)

    def render(self) -> bytes:
        return generate_latest(self.registry)
