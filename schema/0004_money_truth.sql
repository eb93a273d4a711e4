-- Money truth: statuses over all of an order's payments, capture adjustments, voided and charged
-- back, refund failures dated when they failed and raised as exceptions, and the views finance
-- reads to see why. Rows booked under the earlier rules stay (the ledger is append-only); the
-- one-off pass at the end books what the new rules imply for them.

-- Statuses ---------------------------------------------------------------------------------------

alter table recon.orders drop constraint orders_status_check;
alter table recon.orders add constraint orders_status_check check (status in (
    'pending', 'paid', 'partially_refunded', 'refunded', 'voided', 'charged_back', 'rejected'));

alter table recon.invoices drop constraint invoices_payment_link_status_check;
alter table recon.invoices add constraint invoices_payment_link_status_check check (payment_link_status in (
    'unpaid', 'paid', 'partially_refunded', 'refunded', 'voided', 'charged_back'));

alter table recon.payments drop constraint payments_status_check;
alter table recon.payments add constraint payments_status_check check (status in (
    'pending', 'paid', 'partially_refunded', 'refunded', 'voided', 'charged_back'));

-- worker: what the payment's `charge` and `capture_adjustment` rows add up to (equal to the captured
-- amount once it is known), and whether a dispute on it was lost.
alter table recon.payments add column charge_total bigint not null default 0;
alter table recon.payments add column dispute_lost boolean not null default false;
update recon.payments p
set charge_total = coalesce((select sum(l.amount) from recon.ledger_entries l
                             where l.payment_id = p.id and l.kind = 'charge'), 0);

-- Ledger kinds and exceptions --------------------------------------------------------------------

alter table recon.ledger_entries drop constraint ledger_entries_kind_check;
alter table recon.ledger_entries add constraint ledger_entries_kind_check check (kind in (
    'charge', 'capture_adjustment', 'refund', 'refund_reversal', 'dispute_withdrawal', 'dispute_fee',
    'dispute_reinstatement', 'processing_fee'));

alter table recon.exceptions drop constraint exceptions_kind_check;
alter table recon.exceptions add constraint exceptions_kind_check check (kind in (
    'unmatched_charge', 'refund_mismatch', 'over_refund', 'currency_mismatch', 'dead_lettered',
    'refund_failed', 'drift', 'payout_difference'));
alter table recon.exceptions add column resolved_by text;
alter table recon.exceptions add column resolution_note text;

-- An open exception is raised once per cause: (kind, event, object). Older duplicates are closed as
-- such, keeping the first.
update recon.exceptions e
set resolved_at = now(), resolved_by = 'recon migrate', resolution_note = 'duplicate of an open exception'
where e.resolved_at is null
  and exists (select 1 from recon.exceptions f
              where f.resolved_at is null and f.kind = e.kind and f.id < e.id
                and coalesce(f.stripe_event_id, '') = coalesce(e.stripe_event_id, '')
                and coalesce(f.stripe_object_id, '') = coalesce(e.stripe_object_id, ''));
create unique index exceptions_open_once on recon.exceptions
    (kind, coalesce(stripe_event_id, ''), coalesce(stripe_object_id, '')) where resolved_at is null;
create index exceptions_open_by_event on recon.exceptions (stripe_event_id) where resolved_at is null;

alter table recon.audit_log drop constraint audit_log_action_check;
alter table recon.audit_log add constraint audit_log_action_check check (action in (
    'stripe_refund_recorded', 'stripe_refund_reversed', 'dispute_opened', 'dispute_funds_withdrawn',
    'dispute_funds_reinstated', 'dispute_closed', 'status_changed', 'event_unmatched',
    'event_dead_lettered', 'capture_adjusted', 'refund_requested', 'refund_submitted',
    'refund_request_failed', 'order_rejected', 'exception_resolved', 'exception_retried'));

-- What finance sees of refunds, disputes and events ----------------------------------------------

alter table recon.refunds add column failure_reason text;
alter table recon.disputes add column closed_at timestamptz;
update recon.disputes set closed_at = status_created
where status in ('won', 'lost', 'warning_closed', 'prevented');
update recon.payments p set dispute_lost = true
where exists (select 1 from recon.disputes d where d.payment_id = p.id and d.outcome = 'lost');

alter table recon.event_inbox add column stripe_object_id text;
alter table recon.event_inbox add column stripe_charge_id text;
alter table recon.event_inbox add column payment_id bigint;
create index event_inbox_payment_id on recon.event_inbox (payment_id) where payment_id is not null;

-- The body of an event that ended unmatched or mismatched: `recon exceptions retry` queues it
-- again. (Dead letters keep their exact bytes in recon.dead_letters.)
create table recon.event_bodies (
    event_id text primary key,
    body bytea not null,
    kept_at timestamptz not null default now()
);

-- Refunds the back office asks for. The refunds they create point back at them.
create table recon.refund_requests (
    id bigint generated always as identity primary key,
    requested_at timestamptz not null default now(),
    requested_by text not null,
    order_id bigint references recon.orders (id),
    invoice_id bigint references recon.invoices (id),
    payment_id bigint references recon.payments (id),
    amount bigint not null check (amount > 0),
    currency text not null,
    reason text not null check (reason in ('duplicate', 'fraudulent', 'requested_by_customer', 'other')),
    note text,
    state text not null default 'requested' check (state in ('requested', 'submitted', 'succeeded', 'failed')),
    error text
);
alter table recon.refunds add column refund_request_id bigint references recon.refund_requests (id);

-- Order and invoice statuses from all their payments ---------------------------------------------

-- The status an owner takes from its payments: charged back if any payment is; else the money rule
-- over the payments that moved money (captured and net refunded summed); voided when every payment
-- is; pending while none has moved money.
create function recon.owner_money_status(payment_statuses text[], captured bigint, refunded bigint)
returns text language sql immutable parallel safe as $$
    select case
        when 'charged_back' = any(payment_statuses) then 'charged_back'
        when cardinality(payment_statuses) > 0
             and 'voided' = all(payment_statuses) then 'voided'
        when not exists (select 1 from unnest(payment_statuses) s where s not in ('pending', 'voided'))
            then 'pending'
        when refunded <= 0 then 'paid'
        when refunded >= captured then 'refunded'
        else 'partially_refunded'
    end
$$;

-- Recomputes the statuses and disputed flags of the given orders and invoices from all their
-- payments and writes a status_changed audit row for each move, attributed to the event given for
-- that owner. The owners are locked first (in id order) and read after, in a statement of their
-- own: in READ COMMITTED that statement's snapshot sees every payment change committed by whoever
-- held the lock before, so two lanes that change two payments of one order cannot both miss each
-- other. Returns the owners that moved.
create function recon.refresh_owners(
    order_ids bigint[], order_events text[], order_objects text[],
    invoice_ids bigint[], invoice_events text[], invoice_objects text[]
) returns table (kind text, id bigint, field text, old_value text, new_value text)
language plpgsql volatile as $$
begin
    perform 1 from recon.orders o where o.id = any(order_ids) order by o.id for update;
    perform 1 from recon.invoices i where i.id = any(invoice_ids) order by i.id for update;
    return query
    with o_agg as (
        select o.id, o.status as old_status, o.disputed as old_disputed, t.event_id, t.object_id,
               case when o.status = 'rejected' then o.status
                    else recon.owner_money_status(
                        array(select p.status from recon.payments p where p.order_id = o.id),
                        (select coalesce(sum(p.charge_total), 0) from recon.payments p
                         where p.order_id = o.id and p.status not in ('pending', 'voided'))::bigint,
                        (select coalesce(sum(p.amount_refunded), 0) from recon.payments p
                         where p.order_id = o.id and p.status not in ('pending', 'voided'))::bigint)
               end as new_status,
               exists (select 1 from recon.payments p where p.order_id = o.id and p.disputed) as new_disputed
        from unnest(order_ids, order_events, order_objects) as t(owner_id, event_id, object_id)
        join recon.orders o on o.id = t.owner_id
    ), o_upd as (
        update recon.orders o set status = a.new_status, disputed = a.new_disputed
        from o_agg a
        where o.id = a.id and (o.status, o.disputed) is distinct from (a.new_status, a.new_disputed)
        returning o.id
    ), i_agg as (
        select i.id, i.payment_link_status as old_status, i.disputed as old_disputed, t.event_id,
               t.object_id,
               replace(recon.owner_money_status(
                   array(select p.status from recon.payments p where p.invoice_id = i.id),
                   (select coalesce(sum(p.charge_total), 0) from recon.payments p
                    where p.invoice_id = i.id and p.status not in ('pending', 'voided'))::bigint,
                   (select coalesce(sum(p.amount_refunded), 0) from recon.payments p
                    where p.invoice_id = i.id and p.status not in ('pending', 'voided'))::bigint),
                   'pending', 'unpaid') as new_status,
               exists (select 1 from recon.payments p where p.invoice_id = i.id and p.disputed) as new_disputed
        from unnest(invoice_ids, invoice_events, invoice_objects) as t(owner_id, event_id, object_id)
        join recon.invoices i on i.id = t.owner_id
    ), i_upd as (
        update recon.invoices i set payment_link_status = a.new_status, disputed = a.new_disputed
        from i_agg a
        where i.id = a.id and (i.payment_link_status, i.disputed) is distinct from (a.new_status, a.new_disputed)
        returning i.id
    ), moves as (
        select 'order'::text as kind, a.id, 'status'::text as field, a.old_status as old_value,
               a.new_status as new_value, a.event_id, a.object_id
        from o_agg a where a.old_status is distinct from a.new_status
        union all
        select 'order', a.id, 'disputed', a.old_disputed::text, a.new_disputed::text, a.event_id, a.object_id
        from o_agg a where a.old_disputed is distinct from a.new_disputed
        union all
        select 'invoice', a.id, 'payment_link_status', a.old_status, a.new_status, a.event_id, a.object_id
        from i_agg a where a.old_status is distinct from a.new_status
        union all
        select 'invoice', a.id, 'disputed', a.old_disputed::text, a.new_disputed::text, a.event_id, a.object_id
        from i_agg a where a.old_disputed is distinct from a.new_disputed
    ), audited as (
        insert into recon.audit_log (action, stripe_event_id, stripe_object_id, detail)
        select 'status_changed', m.event_id, m.object_id,
               jsonb_build_object('object', m.kind, 'id', m.id, 'field', m.field,
                                  'from', case when m.field = 'disputed' then to_jsonb(m.old_value::boolean)
                                               else to_jsonb(m.old_value) end,
                                  'to', case when m.field = 'disputed' then to_jsonb(m.new_value::boolean)
                                             else to_jsonb(m.new_value) end)
        from moves m
        returning 1
    )
    select m.kind, m.id, m.field, m.old_value, m.new_value from moves m;
end
$$;

-- The views finance reads -------------------------------------------------------------------------

-- One payment's money, the base of the balances: captured (its charge rows), refunded (live refunds
-- booked), what Stripe would refund now (nothing while a dispute is open, after one was lost, or
-- before money moved) and the net of its ledger rows in its own currency.
create view recon.payment_money as
select
    p.id as payment_id,
    p.order_id,
    p.invoice_id,
    p.charge_total as captured,
    p.amount_refunded as refunded,
    case when p.disputed or p.dispute_lost or p.status in ('pending', 'voided') then 0
         else greatest(coalesce(p.amount_captured, p.amount) - p.amount_refunded, 0)
    end::bigint as refundable,
    coalesce((select sum(l.amount) from recon.ledger_entries l
              where l.payment_id = p.id and l.currency = p.currency), 0)::bigint as net_amount
from recon.payments p;

-- Refunds asked for and not booked yet, per owner: requested or submitted, less what of them is
-- already booked as live refunds. They count against what is refundable now.
create view recon.unbooked_requests as
select
    r.order_id,
    r.invoice_id,
    sum(r.amount - coalesce((select sum(f.amount) from recon.refunds f
                             where f.refund_request_id = r.id and f.status in ('pending', 'succeeded')
                               and not f.is_release), 0))::bigint as amount
from recon.refund_requests r
where r.state in ('requested', 'submitted')
group by r.order_id, r.invoice_id;

create or replace view finance.payment_balances as
select
    p.stripe_charge_id,
    o.number as order_number,
    i.number as invoice_number,
    p.currency,
    coalesce(p.amount_captured, p.amount) as amount,
    p.amount_refunded,
    m.refundable as refundable_amount,
    m.net_amount,
    p.status,
    p.disputed,
    (select d.status from recon.disputes d
     where d.payment_id = p.id order by d.created desc, d.id desc limit 1) as dispute_status
from recon.payments p
join recon.payment_money m on m.payment_id = p.id
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id;

create view finance.order_balances as
select
    o.number as order_number,
    o.currency,
    o.amount_total,
    s.captured,
    s.refunded,
    greatest(s.refundable - coalesce(u.amount, 0), 0)::bigint as refundable_now,
    s.net_amount,
    (o.amount_total - (s.captured - s.refunded))::bigint as balance_due,
    o.status,
    o.disputed
from recon.orders o
cross join lateral (
    select coalesce(sum(m.captured), 0)::bigint as captured,
           coalesce(sum(m.refunded), 0)::bigint as refunded,
           coalesce(sum(m.refundable), 0)::bigint as refundable,
           coalesce(sum(m.net_amount), 0)::bigint as net_amount
    from recon.payment_money m where m.order_id = o.id
) s
left join recon.unbooked_requests u on u.order_id = o.id;

create view finance.invoice_balances as
select
    i.number as invoice_number,
    i.currency,
    i.amount_total,
    s.captured,
    s.refunded,
    greatest(s.refundable - coalesce(u.amount, 0), 0)::bigint as refundable_now,
    s.net_amount,
    (i.amount_total - (s.captured - s.refunded))::bigint as balance_due,
    i.payment_link_status as status,
    i.disputed
from recon.invoices i
cross join lateral (
    select coalesce(sum(m.captured), 0)::bigint as captured,
           coalesce(sum(m.refunded), 0)::bigint as refunded,
           coalesce(sum(m.refundable), 0)::bigint as refundable,
           coalesce(sum(m.net_amount), 0)::bigint as net_amount
    from recon.payment_money m where m.invoice_id = i.id
) s
left join recon.unbooked_requests u on u.invoice_id = i.id;

create view finance.refunds as
select
    f.id as stripe_refund_id,
    p.stripe_charge_id,
    o.number as order_number,
    i.number as invoice_number,
    f.amount,
    f.currency,
    finance.major_units(f.amount, f.currency) as amount_decimal,
    f.status,
    f.reason,
    f.failure_reason,
    case when f.refund_request_id is null then 'stripe' else 'app' end as source,
    f.refund_request_id,
    r.note,
    r.requested_by,
    f.created as created_at
from recon.refunds f
join recon.payments p on p.id = f.payment_id
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id
left join recon.refund_requests r on r.id = f.refund_request_id;

create view finance.refund_requests as
select
    r.id,
    r.requested_at,
    r.requested_by,
    o.number as order_number,
    i.number as invoice_number,
    r.amount,
    r.currency,
    r.reason,
    r.note,
    r.state,
    r.error
from recon.refund_requests r
left join recon.orders o on o.id = r.order_id
left join recon.invoices i on i.id = r.invoice_id;

create view finance.disputes as
select
    d.id as stripe_dispute_id,
    p.stripe_charge_id,
    o.number as order_number,
    i.number as invoice_number,
    d.amount,
    d.currency,
    d.reason,
    d.status,
    d.evidence_due_by,
    d.created as opened_at,
    d.closed_at
from recon.disputes d
join recon.payments p on p.id = d.payment_id
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id;

create or replace view finance.exceptions as
select id, raised_at, kind, stripe_event_id, stripe_object_id, detail, resolved_at, resolved_by,
       resolution_note
from recon.exceptions;

create or replace view finance.events as
select
    e.event_id as stripe_event_id,
    e.type,
    e.created,
    e.received_at,
    case when e.outcome = 'retrying' then null else e.processed_at end as processed_at,
    e.outcome,
    e.attempts,
    e.stripe_object_id,
    coalesce(e.stripe_charge_id, p.stripe_charge_id) as stripe_charge_id,
    o.number as order_number,
    i.number as invoice_number
from recon.event_inbox e
left join recon.payments p on p.id = e.payment_id
left join recon.orders o on o.id = p.order_id
left join recon.invoices i on i.id = p.invoice_id;

grant select on finance.payment_balances, finance.order_balances, finance.invoice_balances,
    finance.refunds, finance.refund_requests, finance.disputes, finance.exceptions, finance.events
    to recon_finance;

-- The one-off pass: what the new rules imply for rows booked under the old ones -----------------

-- Books the capture_adjustment a payment's known captured amount implies, recomputes payment
-- statuses (voided, charged back) and then every owner's. Safe to run again: adjustments are keyed
-- by the payment and the amount they settle on, and statuses are recomputed, not toggled.
create function recon.bring_forward() returns void language plpgsql volatile as $$
declare
    order_ids bigint[];
    invoice_ids bigint[];
begin
    -- An authorisation released with nothing captured: the previous rules kept its release (a
    -- refund with reason expired_uncaptured_charge) but not that nothing was captured.
    update recon.payments p set amount_captured = 0
    where p.amount_captured is null
      and exists (select 1 from recon.refunds r
                  where r.payment_id = p.id and r.reason = 'expired_uncaptured_charge'
                    and r.status = 'succeeded');

    -- The charge rows brought to the captured amount, each adjustment audited.
    with due as (
        select p.id, p.currency, p.stripe_charge_id, p.amount_captured, p.charge_total,
               p.snapshot_created, p.recorded_at, p.snapshot_event_id
        from recon.payments p
        where p.charge_booked and p.amount_captured is not null and p.charge_total <> p.amount_captured
        for update of p
    ), booked as (
        insert into recon.ledger_entries
            (occurred_at, kind, source_id, amount, currency, payment_id, stripe_object_id, stripe_event_id)
        select coalesce(d.snapshot_created, d.recorded_at), 'capture_adjustment',
               'payment:' || d.id || ':captured:' || d.amount_captured,
               d.amount_captured - d.charge_total, d.currency, d.id,
               coalesce(d.stripe_charge_id, 'payment:' || d.id), coalesce(d.snapshot_event_id, 'recon migrate')
        from due d
        on conflict (kind, source_id) do nothing
        returning id, payment_id, amount, currency, stripe_object_id, stripe_event_id
    ), adjusted as (
        insert into recon.audit_log (action, stripe_event_id, stripe_object_id, payment_id, detail)
        select 'capture_adjusted', b.stripe_event_id, b.stripe_object_id, b.payment_id,
               jsonb_build_object('entry_id', b.id, 'kind', 'capture_adjustment', 'amount', b.amount,
                                  'currency', b.currency, 'by', 'recon migrate')
        from booked b
    )
    update recon.payments p set charge_total = p.charge_total + b.amount
    from booked b where b.payment_id = p.id;

    -- Each payment's status by the new rules, each move audited.
    with next as (
        select p.id, p.status as old_status, p.stripe_charge_id,
               case
                   when p.dispute_lost then 'charged_back'
                   when p.amount_captured = 0 then 'voided'
                   when not p.charge_booked then 'pending'
                   when p.amount_refunded <= 0 then 'paid'
                   when p.amount_refunded >= coalesce(p.amount_captured, p.amount) then 'refunded'
                   else 'partially_refunded'
               end as new_status
        from recon.payments p
    ), moved as (
        update recon.payments p set status = n.new_status
        from next n
        where n.id = p.id and n.old_status is distinct from n.new_status
        returning p.id, n.old_status, n.new_status, n.stripe_charge_id
    )
    insert into recon.audit_log (action, stripe_object_id, payment_id, detail)
    select 'status_changed', m.stripe_charge_id, m.id,
           jsonb_build_object('object', 'payment', 'field', 'status', 'from', m.old_status,
                              'to', m.new_status, 'by', 'recon migrate')
    from moved m;

    select coalesce(array_agg(distinct order_id) filter (where order_id is not null), '{}'),
           coalesce(array_agg(distinct invoice_id) filter (where invoice_id is not null), '{}')
    into order_ids, invoice_ids
    from recon.payments;
    perform * from recon.refresh_owners(
        order_ids, array_fill(null::text, array[cardinality(order_ids)]),
        array_fill(null::text, array[cardinality(order_ids)]),
        invoice_ids, array_fill(null::text, array[cardinality(invoice_ids)]),
        array_fill(null::text, array[cardinality(invoice_ids)]));
end
$$;

select recon.bring_forward();
