"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own so servers in one process stay apart.

Throughput: `rate(rmtorch_serve_rows_total[1m])` and `rate(rmtorch_serve_tokens_total[1m])` over time; the
`*_per_second` gauges hold the last forward's figures.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

POWERS_OF_TWO = tuple(2**i for i in range(13))  # 1 .. 4096
TOKEN_BUCKETS = tuple(2**i for i in range(6, 19))  # 64 .. 262144
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_tokens = Gauge("rmtorch_serve_queue_tokens", "Tokens waiting for the model.", registry=r)
        self.queue_requests = Gauge("rmtorch_serve_queue_requests", "Requests waiting for the model.", registry=r)
        self.batch_requests = Histogram(
            "rmtorch_serve_batch_requests", "Requests per forward batch.", buckets=POWERS_OF_TWO, registry=r
        )
        self.batch_rows = Histogram(
            "rmtorch_serve_batch_rows", "Rows per forward batch.", buckets=POWERS_OF_TWO, registry=r
        )
        self.batch_tokens = Histogram(
            "rmtorch_serve_batch_tokens", "Tokens per forward batch (before prefix sharing).", buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.forward_seconds = Histogram(
            "rmtorch_serve_forward_seconds", "Time of one batch's scoring.", buckets=SECONDS_BUCKETS, registry=r
        )
        self.rows = Counter("rmtorch_serve_rows", "Rows scored.", registry=r)
        self.tokens = Counter("rmtorch_serve_tokens", "Tokens scored (before prefix sharing).", registry=r)
        self.rows_per_second = Gauge("rmtorch_serve_rows_per_second", "Rows per second of the last batch.", registry=r)
        self.tokens_per_second = Gauge(
            "rmtorch_serve_tokens_per_second", "Tokens per second of the last batch.", registry=r
        )
        self.request_seconds = Histogram(
            "rmtorch_serve_request_seconds", "Time to answer a scoring request (errors: rmtorch_serve_errors).",
            ["endpoint"],
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter("rmtorch_serve_errors", "Error responses, by kind.", ["kind"], registry=r)

    def watch_queue(self, batcher) -> None:
        """Read the queue gauges from `batcher` at each scrape."""
        self.queue_tokens.set_function(lambda: batcher.queued_tokens)
        self.queue_requests.set_function(lambda: batcher.queued_requests)

    def observe_batch(self, requests: int, rows: int, tokens: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.forward_seconds.observe(seconds)
        self.rows.inc(rows)
        self.tokens.inc(tokens)
        self.rows_per_second.set(rows / max(seconds, 1e-9))
        self.tokens_per_second.set(tokens / max(seconds, 1e-9))

    def render(self) -> bytes:
        return generate_latest(self.registry)
