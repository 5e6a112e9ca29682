"""Prometheus metrics of one server (its own registry, so several apps in one process do not mix)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..adapters import SampleStats
from .generation import RowResult

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SAMPLE_HELP = {  # `SampleStats` field -> what it counts, per request
    "image_tokens": "Image tokens of the request's own images that its text sees (padding tiles excluded)",
    "kept_tokens": "Of those, image tokens kept for the trimmed cross-attention layers",
    "extra_tokens": "Tokens a method added for those layers (e.g. one remainder per tile)",
    "cross_kv_bytes_before": "Cross-attention KV cache bytes of the request's own tokens, untrimmed",
    "cross_kv_bytes_after": "Cross-attention KV cache bytes of the request's own tokens, as served",
}


class ServeMetrics:
    """Counters, gauges and histograms of requests, the queue, batches and trimming."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "trimllama_requests",
            "Chat completion requests by outcome (completed, cancelled, failed, rejected, invalid)",
            ["outcome"],
            registry=registry,
        )
        self.queue_depth = Gauge("trimllama_queue_depth", "Requests waiting for a batch", registry=registry)
        self.encoding = Gauge(
            "trimllama_encoding_requests",
            "Requests whose images are being decoded and prompt tokenized (at most --encode-workers)",
            registry=registry,
        )
        self.decoding = Gauge(
            "trimllama_decoding_requests",
            "Of those, requests with images (at most --max-concurrent-decodes)",
            registry=registry,
        )
        self.running = Gauge("trimllama_running_requests", "Requests in the batch being generated", registry=registry)
        self.batch_size = Histogram(
            "trimllama_batch_size", "Requests served together in one batch", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.latency = Histogram(
            "trimllama_request_latency_seconds",
            "Time from a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "trimllama_queue_wait_seconds",
            "Time a request waited before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("trimllama_prompt_tokens", "Prompt tokens of completed requests", registry=registry)
        self.completion_tokens = Counter(
            "trimllama_completion_tokens", "Generated tokens of completed requests", registry=registry
        )
        self.samples = {  # one counter per `SampleStats` field, of the same name and meaning
            field.name: Counter(
                f"trimllama_{field.name}", f"{SAMPLE_HELP[field.name]}, summed over completed requests", registry=registry
            )
            for field in dataclasses.fields(SampleStats)
        }
        for outcome in ("completed", "cancelled", "failed", "rejected", "invalid"):
            self.requests.labels(outcome)

    def record_result(self, result: RowResult, latency_s: float) -> None:
        self.requests.labels("completed").inc()
        self.latency.observe(latency_s)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        for name, counter in self.samples.items():
            counter.inc(getattr(result.trim.sample, name))

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)
