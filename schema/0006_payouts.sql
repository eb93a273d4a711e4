-- Payouts (rule 13): each Stripe payout the webhooks or `recon payouts` saw, and its lines — the
-- balance transactions Stripe paid out in it — each matched to the ledger. The ledger kind
-- processing_fee and the exception kinds drift and payout_difference exist since 0004.

-- One row per payout. Its status moves forward only, by (snapshot time, lifecycle rank), like a
-- refund's; `reconciliation` is ours: pending until its lines were matched, then matched or
-- differences. The reconciler claims due rows by next_attempt_at (a lease while it works, a
-- backoff while Stripe's own reconciliation_status is not yet completed).
create table recon.payouts (
    id text primary key,                              -- po_…
    amount bigint not null,                           -- minor units of `currency`, as Stripe sends it
    currency text not null check (currency = lower(currency)),
    arrival_date date,
    automatic boolean,                                -- only automatic payouts list their transactions
    status text not null
        check (status in ('pending', 'in_transit', 'paid', 'failed', 'canceled')),
    status_created timestamptz not null,
    status_rank int not null,
    stripe_reconciliation_status text,                -- Stripe's: not_applicable, in_progress, completed
    stripe_event_id text,                             -- the newest event (or 'recon payouts') that saved it
    created timestamptz,
    reconciliation text not null default 'pending'
        check (reconciliation in ('pending', 'matched', 'differences')),
    lines_net bigint,                                 -- Σ net of its lines, once they were listed
    difference_amount bigint not null default 0,      -- Σ what the ledger does not explain, payout currency
    reconciled_at timestamptz,
    attempts int not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error text
);
create index payouts_due on recon.payouts (next_attempt_at)
    where status = 'paid' and reconciliation = 'pending';
create index payouts_arrival on recon.payouts (arrival_date);

-- The lines of a payout's latest reconciliation. Amounts are the balance transaction's: the
-- settlement currency, with Stripe's exchange_rate when the source was in another currency.
-- entry_id is the ledger row the line was matched to (the charge, refund, reversal or dispute
-- movement); ledger_amount what that row (or rows) say, for a line that differs.
create table recon.payout_lines (
    payout_id text not null references recon.payouts (id),
    balance_transaction_id text not null,             -- txn_…
    type text not null,
    reporting_category text,
    source_id text,
    amount bigint not null,
    fee bigint not null,
    net bigint not null,
    currency text not null,
    exchange_rate numeric,
    match text not null check (match in ('matched', 'missing_in_ledger', 'amount_differs', 'not_ours')),
    entry_id bigint,                                  -- recon.ledger_entries.id (no foreign key: the
                                                      -- ledger refuses TRUNCATE itself, by trigger)
    ledger_amount bigint,
    difference bigint not null default 0,             -- net − what the ledger books for the line
    created timestamptz not null,
    primary key (payout_id, balance_transaction_id)
);
create index payout_lines_source on recon.payout_lines (source_id);

create view finance.payouts as
select
    p.id as stripe_payout_id,
    p.arrival_date,
    p.amount,
    p.currency,
    p.status,
    p.reconciliation,
    coalesce(l.lines, 0)::bigint as lines,
    coalesce(l.matched_lines, 0)::bigint as matched_lines,
    coalesce(l.difference_lines, 0)::bigint as difference_lines,
    p.difference_amount
from recon.payouts p
left join lateral (
    select count(*) as lines,
           count(*) filter (where x.match = 'matched') as matched_lines,
           count(*) filter (where x.match in ('missing_in_ledger', 'amount_differs')) as difference_lines
    from recon.payout_lines x where x.payout_id = p.id
) l on true;

create view finance.payout_lines as
select
    x.payout_id as stripe_payout_id,
    x.balance_transaction_id,
    x.type,
    x.reporting_category,
    x.source_id,
    x.amount,
    x.fee,
    x.net,
    x.currency,
    x.exchange_rate,
    x.match,
    x.entry_id
from recon.payout_lines x;

grant select on finance.payouts, finance.payout_lines to recon_finance;
