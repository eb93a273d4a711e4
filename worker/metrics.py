"""Every Prometheus metric the receiver and the worker expose, in one place.

docs/operations.md lists them; keep the two in step.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Receiver
WEBHOOKS_RECEIVED = Counter("recon_webhooks_received", "POSTs to /webhooks/stripe", ["type"])
WEBHOOKS_VERIFIED = Counter("recon_webhooks_verified", "Webhooks whose signature verified", ["type"])
WEBHOOKS_REJECTED = Counter("recon_webhooks_rejected", "Webhooks answered 4xx/5xx", ["reason"])
WEBHOOKS_QUEUED = Counter("recon_webhooks_queued", "Webhooks durably queued (confirmed)", ["type"])
WEBHOOKS_IGNORED = Counter("recon_webhooks_ignored", "Verified webhooks of types not handled", ["type"])
WEBHOOK_ACK_SECONDS = Histogram(
    "recon_webhook_ack_seconds", "From request start to the answer", buckets=_LATENCY_BUCKETS_S
)

# Worker
EVENTS_PROCESSED = Counter("recon_events_processed", "Events reaching an outcome", ["type", "outcome"])
EVENTS_RETRIED = Counter("recon_events_retried", "Events deferred for a later attempt", ["type", "reason"])
EVENTS_DEAD_LETTERED = Counter("recon_events_dead_lettered", "Events sent to the dead-letter queue", ["type"])
RECONCILE_SECONDS = Histogram(
    "recon_reconcile_seconds", "From delivery to commit of one event", buckets=_LATENCY_BUCKETS_S
)
DEAD_LETTERS_PARKED = Counter(
    "recon_dead_letters_parked", "Dead letters the database refused, moved to recon.dead-letters.parked"
)
DEFERRED_EVENTS = Gauge("recon_deferred_events", "Deferred events waiting in recon.deferred_events")
DEFERRED_OVERDUE_SECONDS = Gauge(
    "recon_deferred_overdue_seconds", "How long the oldest due deferred event has waited past its time"
)
QUEUE_DEPTH = Gauge("recon_queue_depth", "Messages ready in a queue", ["queue"])
CONSUMER_LAG_SECONDS = Gauge(
    "recon_consumer_lag_seconds", "Age (since first queued) of the last event the worker committed"
)

# Back office: refund requests and the two outboxes (buyer e-mail, host webhooks)
REFUND_REQUESTS = Counter("recon_refund_requests", "Refund requests reaching a state", ["state"])
OUTBOX_PENDING = Gauge("recon_outbox_pending", "Outbox rows not yet delivered", ["channel"])
OUTBOX_OLDEST_AGE_SECONDS = Gauge(
    "recon_outbox_oldest_age_seconds", "Age of the oldest undelivered outbox row", ["channel"]
)
OUTBOX_SENT = Counter("recon_outbox_sent", "Outbox rows delivered", ["channel"])
OUTBOX_SEND_FAILURES = Counter("recon_outbox_send_failures", "Failed delivery attempts", ["channel"])

# Payouts and the drift check against Stripe
PAYOUTS_RECONCILED = Counter(
    "recon_payouts_reconciled", "Payout reconciliations by result", ["reconciliation"]
)
DRIFT_FOUND = Counter("recon_drift_found", "Differences the drift check found", ["kind"])
VERIFY_RUNS = Counter("recon_verify_runs", "Drift checks run, by result", ["result"])
