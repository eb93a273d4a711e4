-- What finance reads (CONTRACT §6): read-only views in schema `finance`, SELECT for recon_finance.
--
-- The currency exponent lives in schema finance, not recon: a view's caller needs EXECUTE on the
-- functions it calls and USAGE on their schema, and recon_finance has no USAGE on recon.

-- Stripe's minor-unit exponents: zero-decimal and three-decimal currencies, else two.
create function finance.currency_exponent(currency text) returns int
language sql immutable parallel safe strict as $$
    select case
        when lower(currency) in ('bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg',
                                 'rwf', 'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf') then 0
        when lower(currency) in ('bhd', 'jod', 'kwd', 'omr', 'tnd') then 3
        else 2
    end
$$;

-- Minor units → major units as an exact numeric with the currency's scale (JPY 110000 → 110000,
-- USD 1050 → 10.50, KWD 1005 → 1.005).
create function finance.major_units(amount bigint, currency text) returns numeric
language sql immutable parallel safe strict as $$
    select round(amount::numeric / (10::numeric ^ finance.currency_exponent(currency)),
                 finance.currency_exponent(currency))
$$;

create view finance.ledger as
select
    l.id as entry_id,
    l.booked_at,
    l.occurred_at,
    l.kind,
    l.amount,
    l.currency,
    finance.major_units(l.amount, l.currency) as amount_decimal,
    o.number as order_number,
    i.number as invoice_number,
    p.stripe_charge_id,
    l.stripe_object_id,
    l.stripe_event_id
from recon.ledger_entries l
join recon.payments p on p.id = l.payment_id
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id;

-- amount: what the payment is for (captured amount once Stripe showed it); net_amount: the sum of
-- the ledger rows in the payment's currency (a dispute fee settled in another currency is not in it).
create view finance.payment_balances as
select
    p.stripe_charge_id,
    o.number as order_number,
    i.number as invoice_number,
    p.currency,
    coalesce(p.amount_captured, p.amount) as amount,
    p.amount_refunded,
    greatest(coalesce(p.amount_captured, p.amount) - p.amount_refunded, 0) as refundable_amount,
    coalesce((select sum(l.amount) from recon.ledger_entries l
              where l.payment_id = p.id and l.currency = p.currency), 0)::bigint as net_amount,
    p.status,
    p.disputed,
    (select d.status from recon.disputes d
     where d.payment_id = p.id order by d.created desc, d.id desc limit 1) as dispute_status
from recon.payments p
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id;

create view finance.open_disputes as
select
    d.id as stripe_dispute_id,
    p.stripe_charge_id,
    o.number as order_number,
    i.number as invoice_number,
    d.amount,
    d.currency,
    d.reason,
    d.status,
    d.evidence_due_by
from recon.disputes d
join recon.payments p on p.id = d.payment_id
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id
where d.status not in ('won', 'lost', 'warning_closed', 'prevented');

create view finance.exceptions as
select id, raised_at, kind, stripe_event_id, stripe_object_id, detail, resolved_at
from recon.exceptions;

create view finance.events as
select
    event_id as stripe_event_id,
    type,
    created,
    received_at,
    case when outcome = 'retrying' then null else processed_at end as processed_at,
    outcome,
    attempts
from recon.event_inbox;

grant select on finance.ledger, finance.payment_balances, finance.open_disputes,
    finance.exceptions, finance.events to recon_finance;
