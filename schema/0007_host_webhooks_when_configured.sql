-- Host webhooks are queued only by sessions that may deliver them. A process with no
-- RECON_HOST_WEBHOOK_URL opens its connections with recon.host_webhooks = 'off' (worker/settings.py,
-- Settings.database_session): its status changes queue no row that its sender would only mark
-- skipped. Those rows were about 40% of PostgreSQL's work per event in a drain
-- (docs/performance.md). A session that says nothing (psql, `recon migrate`, the host's own code)
-- still queues, so no webhook is lost to a connection that was not told.

create function recon.host_webhooks_on() returns boolean
language sql stable parallel safe as $$
    select coalesce(current_setting('recon.host_webhooks', true), '') <> 'off'
$$;

-- The same triggers as 0005, each with the session's switch in its WHEN: the trigger function is
-- not even called when it is off.
drop trigger orders_status_webhook on recon.orders;
create trigger orders_status_webhook after update of status on recon.orders
    for each row when (old.status is distinct from new.status and recon.host_webhooks_on())
    execute function recon.host_webhook_owner_status();

drop trigger invoices_status_webhook on recon.invoices;
create trigger invoices_status_webhook after update of payment_link_status on recon.invoices
    for each row when (old.payment_link_status is distinct from new.payment_link_status
                       and recon.host_webhooks_on())
    execute function recon.host_webhook_owner_status();

drop trigger disputes_webhook on recon.disputes;
create trigger disputes_webhook after insert or update of status on recon.disputes
    for each row when (recon.host_webhooks_on())
    execute function recon.host_webhook_dispute();

drop trigger refunds_failed_webhook on recon.refunds;
create trigger refunds_failed_webhook after insert or update of status on recon.refunds
    for each row when (recon.host_webhooks_on())
    execute function recon.host_webhook_refund_failed();

drop trigger refund_requests_failed_webhook on recon.refund_requests;
create trigger refund_requests_failed_webhook after update of state on recon.refund_requests
    for each row when (new.state = 'failed' and old.state <> 'failed' and recon.host_webhooks_on())
    execute function recon.host_webhook_request_failed();
