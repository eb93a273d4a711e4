-- An order's (or invoice's) balances count only the payments in its own currency, and what is
-- refundable now is the sum of what each of them can still give, as the back office's cap counts
-- it (recon.payment_refundable: each payment less the unbooked parts held against it). Before, the views added minor units across currencies when the host had
-- recorded a payment in another currency, and subtracted every unbooked part at the owner's level:
-- a part held on a payment that was then disputed (refundable 0) still lowered the owner's figure,
-- so the console and the API's refundable_after showed less than could be refunded. The columns
-- are unchanged. A payment in another currency still shows in finance.payment_balances, in its own.

-- A payment without a charge gives nothing: there is nothing at Stripe to refund. Said once here,
-- for the cap (worker/backoffice/store.py) and the balances alike; the columns are 0005's.
create or replace view recon.payment_refundable as
select m.payment_id,
       case when p.stripe_charge_id is null then 0
            else greatest(m.refundable - coalesce((select sum(u.amount) from recon.unbooked_parts u
                                                   where u.payment_id = m.payment_id), 0), 0)
       end::bigint as refundable
from recon.payment_money m
join recon.payments p on p.id = m.payment_id;

create or replace view finance.order_balances as
select
    o.number as order_number,
    o.currency,
    o.amount_total,
    s.captured,
    s.refunded,
    s.refundable_now,
    s.net_amount,
    (o.amount_total - (s.captured - s.refunded))::bigint as balance_due,
    o.status,
    o.disputed
from recon.orders o
cross join lateral (
    select coalesce(sum(m.captured), 0)::bigint as captured,
           coalesce(sum(m.refunded), 0)::bigint as refunded,
           coalesce(sum(r.refundable), 0)::bigint as refundable_now,
           coalesce(sum(m.net_amount), 0)::bigint as net_amount
    from recon.payments p
    join recon.payment_money m on m.payment_id = p.id
    join recon.payment_refundable r on r.payment_id = p.id
    where p.order_id = o.id and p.currency = o.currency
) s;

create or replace view finance.invoice_balances as
select
    i.number as invoice_number,
    i.currency,
    i.amount_total,
    s.captured,
    s.refunded,
    s.refundable_now,
    s.net_amount,
    (i.amount_total - (s.captured - s.refunded))::bigint as balance_due,
    i.payment_link_status as status,
    i.disputed
from recon.invoices i
cross join lateral (
    select coalesce(sum(m.captured), 0)::bigint as captured,
           coalesce(sum(m.refunded), 0)::bigint as refunded,
           coalesce(sum(r.refundable), 0)::bigint as refundable_now,
           coalesce(sum(m.net_amount), 0)::bigint as net_amount
    from recon.payments p
    join recon.payment_money m on m.payment_id = p.id
    join recon.payment_refundable r on r.payment_id = p.id
    where p.invoice_id = i.id and p.currency = i.currency
) s;
