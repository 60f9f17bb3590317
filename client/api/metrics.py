"""The local API's Prometheus metrics (``/metrics``, token-guarded)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics of one app instance (own registry: several apps per process work)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedpersona_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.chat_seconds = Histogram(
            "fedpersona_chat_seconds", "Chat completion latency", registry=self.registry
        )
        self.first_token_seconds = Histogram(
            "fedpersona_first_token_seconds",
            "Time to the first streamed piece of an answer",
            buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 5, 10),
            registry=self.registry,
        )
        self.adapt_seconds = Histogram(
            "fedpersona_feedback_adaptation_seconds",
            "Real-time adaptation time per feedback",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.feedback = Counter(
            "fedpersona_feedback", "Feedback received", ["kind"], registry=self.registry
        )
        self.interactions = Gauge(
            "fedpersona_interactions", "Interactions in the store", registry=self.registry
        )
        self.user_epsilon = Gauge(
            "fedpersona_user_epsilon", "User-level ε spent (device ledger)", registry=self.registry
        )
