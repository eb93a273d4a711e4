-- Deferred events (rule 8's waits) are kept here until they are due, then the worker publishes
-- them back to recon.events. They used to wait in the recon.wait.<delay> quorum queues and come
-- back by the broker's at-least-once dead-lettering, whose helper process did not survive a queue
-- leader's death on RabbitMQ 3.10.8: in 4 of 5 failover runs some stayed parked in the broker
-- until an operator acted (docs/cluster.md). The wait queues stay declared until they have drained.

create table recon.deferred_events (
    id bigint generated always as identity primary key,
    deferred_at timestamptz not null default now(),
    due_at timestamptz not null,
    event_id text not null,
    message_type text,
    body bytea not null,
    -- The message's own x-recon-* headers (attempt, failures, first seen, created).
    headers jsonb not null,
    -- Set while a worker publishes it; a worker that died mid-way leaves it to be taken again.
    claimed_until timestamptz
);

create index deferred_events_due on recon.deferred_events (due_at);
