-- The back office: refund requests split into one part per payment (each part is one Stripe
-- refund), and the two outboxes (buyer e-mails, host webhooks) filled in the transaction of the
-- change that causes them.

-- Refund requests -------------------------------------------------------------------------------

-- Who asked and under which Idempotency-Key (scoped to the caller), a fingerprint of what they
-- asked, whether the buyer is e-mailed, and the uid the Stripe idempotency keys derive from (the
-- serial id alone would collide between two databases sharing one Stripe account).
alter table recon.refund_requests add column idempotency_key text;
alter table recon.refund_requests add column fingerprint text;
alter table recon.refund_requests add column notify_buyer boolean not null default true;
alter table recon.refund_requests add column message text;
alter table recon.refund_requests add column rejects_order boolean not null default false;
alter table recon.refund_requests add column uid uuid not null default gen_random_uuid();
alter table recon.refund_requests add column updated_at timestamptz not null default now();
alter table recon.refund_requests add constraint refund_requests_note_for_other
    check (reason <> 'other' or coalesce(btrim(note), '') <> '');
create unique index refund_requests_idempotency on recon.refund_requests (requested_by, idempotency_key)
    where idempotency_key is not null;
create index refund_requests_open on recon.refund_requests (requested_at)
    where state in ('requested', 'submitted');

-- One Stripe refund per payment of a request. `state` follows the refund: requested (intent
-- committed, Stripe not answered yet), submitted (Stripe accepted it: its re_ id is known),
-- succeeded (booked and succeeded), failed (Stripe refused it, or the refund failed).
-- `lease_until` keeps two submitters (the API call and the worker's recovery) off one part.
create table recon.refund_request_parts (
    request_id bigint not null references recon.refund_requests (id),
    payment_id bigint not null references recon.payments (id),
    amount bigint not null check (amount > 0),
    idempotency_key text not null unique,
    stripe_refund_id text unique,
    state text not null default 'requested'
        check (state in ('requested', 'submitted', 'succeeded', 'failed')),
    error text,
    error_code text,
    attempts int not null default 0,
    lease_until timestamptz,
    primary key (request_id, payment_id)
);
create index refund_request_parts_payment on recon.refund_request_parts (payment_id);

-- What a part still holds back from its payment: its amount less the live refunds booked for it
-- (nothing once it failed). Counted from parts, so a request split over several payments holds
-- each payment back by its own share.
create view recon.unbooked_parts as
select
    q.request_id,
    q.payment_id,
    case when q.state = 'failed' then 0
         else greatest(q.amount - coalesce((select sum(f.amount) from recon.refunds f
                                            where f.refund_request_id = q.request_id
                                              and f.payment_id = q.payment_id
                                              and f.status in ('pending', 'succeeded')
                                              and not f.is_release), 0), 0)
    end::bigint as amount
from recon.refund_request_parts q;

create or replace view recon.unbooked_requests as
select p.order_id, p.invoice_id, sum(u.amount)::bigint as amount
from recon.unbooked_parts u
join recon.payments p on p.id = u.payment_id
group by p.order_id, p.invoice_id;

-- What each payment can still be refunded now: Stripe's refundable (0 while disputed, after a
-- lost dispute, before money moved) less what open parts hold back.
create view recon.payment_refundable as
select m.payment_id,
       greatest(m.refundable - coalesce((select sum(u.amount) from recon.unbooked_parts u
                                         where u.payment_id = m.payment_id), 0), 0)::bigint as refundable
from recon.payment_money m;

-- A request's state from its parts: failed if any part failed; succeeded when every part did;
-- submitted when Stripe accepted every part; else requested. It only moves forward (failed is
-- final), and each move writes its audit row. Returns the state before and after.
create function recon.settle_refund_request(p_request_id bigint, p_event_id text)
returns table (old_state text, new_state text)
language plpgsql volatile as $$
declare
    current_state text;
    derived text;
    failure text;
begin
    select r.state into current_state from recon.refund_requests r where r.id = p_request_id for update;
    if current_state is null then
        return;
    end if;
    select case
               when bool_or(q.state = 'failed') then 'failed'
               when bool_and(q.state = 'succeeded') then 'succeeded'
               when bool_and(q.state in ('submitted', 'succeeded')) then 'submitted'
               else 'requested'
           end,
           string_agg(q.error, '; ' order by q.payment_id) filter (where q.state = 'failed')
    into derived, failure
    from recon.refund_request_parts q where q.request_id = p_request_id;
    old_state := current_state;
    new_state := current_state;
    if derived is distinct from current_state and current_state <> 'failed'
       and (derived = 'failed'
            or array_position(array['requested', 'submitted', 'succeeded'], derived)
               > array_position(array['requested', 'submitted', 'succeeded'], current_state)) then
        update recon.refund_requests
        set state = derived, error = case when derived = 'failed' then failure else error end,
            updated_at = now()
        where id = p_request_id;
        new_state := derived;
        if derived = 'failed' then
            insert into recon.audit_log (action, stripe_event_id, detail)
            values ('refund_request_failed', p_event_id,
                    jsonb_build_object('refund_request_id', p_request_id, 'from', current_state,
                                       'error', failure));
        elsif current_state = 'requested' then
            insert into recon.audit_log (action, stripe_event_id, detail)
            values ('refund_submitted', p_event_id,
                    jsonb_build_object('refund_request_id', p_request_id, 'to', derived));
        end if;
    end if;
    return next;
end
$$;

-- Outboxes --------------------------------------------------------------------------------------

-- One row per message to deliver, at least once. `message_id` is what the receiver dedupes on
-- (the host webhook's id, the e-mail's Message-ID) and never changes across attempts; `dedupe_key`
-- keeps a cause from queueing its message twice (one e-mail per refund).
-- state: pending (to send, from due_at), sent, skipped (nothing configured to send it with, or
-- not wanted), gave_up (refused for good, or retried past its deadline).
create table recon.outbox (
    id bigint generated always as identity primary key,
    channel text not null check (channel in ('email', 'host_webhook')),
    topic text not null,
    message_id text not null unique,
    dedupe_key text unique,
    payload jsonb not null,
    created_at timestamptz not null default now(),
    due_at timestamptz not null default now(),
    attempts int not null default 0,
    last_error text,
    state text not null default 'pending' check (state in ('pending', 'sent', 'skipped', 'gave_up')),
    finished_at timestamptz
);
create index outbox_due on recon.outbox (channel, due_at) where state = 'pending';
create index outbox_finished on recon.outbox (finished_at) where state <> 'pending';

create function recon.queue_host_webhook(p_type text, p_data jsonb) returns void
language sql volatile as $$
    insert into recon.outbox (channel, topic, message_id, payload)
    values ('host_webhook', p_type, 'evt_recon_' || replace(gen_random_uuid()::text, '-', ''),
            jsonb_build_object('type', p_type, 'data', p_data))
$$;

-- Host webhooks from the changes themselves: whichever statement moves a status, the webhook is
-- queued in its transaction.
create function recon.host_webhook_owner_status() returns trigger
language plpgsql as $$
begin
    if tg_table_name = 'orders' then
        perform recon.queue_host_webhook('order.status_changed', jsonb_build_object(
            'order_number', new.number, 'status', new.status, 'previous_status', old.status,
            'disputed', new.disputed));
    else
        perform recon.queue_host_webhook('invoice.status_changed', jsonb_build_object(
            'invoice_number', new.number, 'status', new.payment_link_status,
            'previous_status', old.payment_link_status, 'disputed', new.disputed));
    end if;
    return null;
end
$$;

create trigger orders_status_webhook after update of status on recon.orders
    for each row when (old.status is distinct from new.status)
    execute function recon.host_webhook_owner_status();
create trigger invoices_status_webhook after update of payment_link_status on recon.invoices
    for each row when (old.payment_link_status is distinct from new.payment_link_status)
    execute function recon.host_webhook_owner_status();

-- The owner numbers and charge of a payment, for the webhooks about its refunds and disputes.
create function recon.payment_refs(p_payment_id bigint) returns jsonb
language sql stable as $$
    select jsonb_build_object('stripe_charge_id', p.stripe_charge_id, 'order_number', o.number,
                              'invoice_number', i.number)
    from recon.payments p
    left join recon.orders o on o.id = p.order_id
    left join recon.invoices i on i.id = p.invoice_id
    where p.id = p_payment_id
$$;

create function recon.host_webhook_dispute() returns trigger
language plpgsql as $$
declare
    closed constant text[] := array['won', 'lost', 'warning_closed', 'prevented'];
    was_open boolean := tg_op = 'UPDATE' and not (old.status = any(closed));
    is_open boolean := not (new.status = any(closed));
begin
    if (tg_op = 'INSERT' or not was_open) and is_open then
        perform recon.queue_host_webhook('dispute.opened', recon.payment_refs(new.payment_id) || jsonb_build_object(
            'dispute_id', new.id, 'amount', new.amount, 'currency', new.currency, 'reason', new.reason,
            'status', new.status, 'evidence_due_by', new.evidence_due_by));
    elsif (tg_op = 'INSERT' or was_open) and not is_open then
        perform recon.queue_host_webhook('dispute.closed', recon.payment_refs(new.payment_id) || jsonb_build_object(
            'dispute_id', new.id, 'amount', new.amount, 'currency', new.currency, 'reason', new.reason,
            'status', new.status, 'outcome', new.outcome));
    end if;
    return null;
end
$$;

create trigger disputes_webhook after insert or update of status on recon.disputes
    for each row execute function recon.host_webhook_dispute();

create function recon.host_webhook_refund_failed() returns trigger
language plpgsql as $$
begin
    if new.status in ('failed', 'canceled') and not new.is_release
       and (tg_op = 'INSERT' or old.status not in ('failed', 'canceled')) then
        perform recon.queue_host_webhook('refund.failed', recon.payment_refs(new.payment_id) || jsonb_build_object(
            'refund_id', new.id, 'amount', new.amount, 'currency', new.currency, 'status', new.status,
            'failure_reason', new.failure_reason, 'refund_request_id', new.refund_request_id));
    end if;
    return null;
end
$$;

create trigger refunds_failed_webhook after insert or update of status on recon.refunds
    for each row execute function recon.host_webhook_refund_failed();

create function recon.host_webhook_request_failed() returns trigger
language plpgsql as $$
begin
    perform recon.queue_host_webhook('refund_request.failed', jsonb_build_object(
        'refund_request_id', new.id,
        'order_number', (select o.number from recon.orders o where o.id = new.order_id),
        'invoice_number', (select i.number from recon.invoices i where i.id = new.invoice_id),
        'stripe_charge_id', (select p.stripe_charge_id from recon.payments p where p.id = new.payment_id),
        'amount', new.amount, 'currency', new.currency, 'reason', new.reason, 'error', new.error,
        'requested_by', new.requested_by));
    return null;
end
$$;

create trigger refund_requests_failed_webhook after update of state on recon.refund_requests
    for each row when (new.state = 'failed' and old.state <> 'failed')
    execute function recon.host_webhook_request_failed();

-- A refund snapshot the rules applied, followed up: link it to the request its metadata names
-- (only a request with a part for this payment: metadata is anyone's to write), move that part
-- and the request on, and queue the buyer's e-mail the first time the refund is booked. The
-- e-mail goes to the order's buyer_email or the invoice's bill_to when that is an address; a
-- refund made outside the app is queued as such, and the sender sends it only when configured to.
create function recon.follow_refund(p_refund_id text, p_request_id bigint, p_payment_id bigint,
                                    p_event_id text)
returns table (linked_request_id bigint, request_state text, email_queued boolean)
language plpgsql volatile as $$
declare
    refund recon.refunds%rowtype;
    request recon.refund_requests%rowtype;
    recipient text;
    owner_order text;
    owner_invoice text;
begin
    linked_request_id := null;
    request_state := null;
    email_queued := false;
    select * into refund from recon.refunds f where f.id = p_refund_id;
    if refund.id is null then
        return next;
        return;
    end if;
    if p_request_id is not null and refund.refund_request_id is null
       and exists (select 1 from recon.refund_request_parts q
                   where q.request_id = p_request_id and q.payment_id = refund.payment_id) then
        update recon.refunds set refund_request_id = p_request_id where id = p_refund_id;
        refund.refund_request_id := p_request_id;
    end if;
    if refund.refund_request_id is not null then
        linked_request_id := refund.refund_request_id;
        update recon.refund_request_parts q
        set stripe_refund_id = p_refund_id,
            state = case when q.state = 'failed' then 'failed'
                         when refund.status in ('failed', 'canceled') then 'failed'
                         when refund.status = 'succeeded' then 'succeeded'
                         when q.state = 'succeeded' then 'succeeded'
                         else 'submitted' end,
            error = case when refund.status in ('failed', 'canceled') and q.state <> 'failed'
                         then coalesce(refund.failure_reason, 'refund ' || refund.status) else q.error end,
            error_code = case when refund.status in ('failed', 'canceled') and q.state <> 'failed'
                              then refund.failure_reason else q.error_code end
        where q.request_id = refund.refund_request_id and q.payment_id = refund.payment_id
          and (q.stripe_refund_id is null or q.stripe_refund_id = p_refund_id);
        select s.new_state into request_state
        from recon.settle_refund_request(refund.refund_request_id, p_event_id) s;
        select * into request from recon.refund_requests r where r.id = refund.refund_request_id;
    end if;
    if refund.status in ('pending', 'succeeded') and not refund.is_release
       and (request.id is null or request.notify_buyer)
       and exists (select 1 from recon.ledger_entries l where l.kind = 'refund' and l.source_id = p_refund_id) then
        select o.number, i.number,
               case when o.id is not null then nullif(btrim(o.buyer_email), '')
                    when position('@' in coalesce(i.bill_to, '')) > 0 then btrim(i.bill_to) end
        into owner_order, owner_invoice, recipient
        from recon.payments p
        left join recon.orders o on o.id = p.order_id
        left join recon.invoices i on i.id = p.invoice_id
        where p.id = refund.payment_id;
        if recipient is not null then
            insert into recon.outbox (channel, topic, message_id, dedupe_key, payload)
            values ('email', 'refund.booked', 'refund-' || p_refund_id, 'refund-email:' || p_refund_id,
                    jsonb_build_object(
                        'refund_id', p_refund_id, 'amount', refund.amount, 'currency', refund.currency,
                        'amount_decimal', finance.major_units(refund.amount, refund.currency)::text,
                        'order_number', owner_order, 'invoice_number', owner_invoice, 'to', recipient,
                        'message', request.message, 'refund_request_id', request.id,
                        'source', case when request.id is null then 'stripe' else 'app' end))
            on conflict do nothing;
            email_queued := found;
        end if;
    end if;
    return next;
end
$$;
