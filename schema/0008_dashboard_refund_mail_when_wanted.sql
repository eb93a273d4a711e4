-- Buyer e-mails about refunds made outside the app (the Stripe dashboard, the API) are queued only
-- by sessions of a process that sends them. A process with RECON_NOTIFY_DASHBOARD_REFUNDS off opens
-- its connections with recon.dashboard_refund_mail = 'off' (worker/settings.py,
-- Settings.database_session), and the row recon.follow_refund would write is not inserted: its
-- sender would only mark it skipped, at the cost of an insert, a claim, a finish and a prune per
-- refund. E-mails for refunds asked for in the app are queued as before, and kept as recorded
-- when no SMTP_URL is set. A session that says nothing still queues (as 0007 does for webhooks).

create function recon.dashboard_refund_mail_on() returns boolean
language sql stable parallel safe as $$
    select coalesce(current_setting('recon.dashboard_refund_mail', true), '') <> 'off'
$$;

-- A BEFORE trigger that returns null skips the row; its WHEN keeps it from being called for
-- anything else.
create function recon.skip_outbox_row() returns trigger
language plpgsql as $$
begin
    return null;
end
$$;

create trigger outbox_dashboard_refund_mail before insert on recon.outbox
    for each row when (new.channel = 'email' and new.payload->>'source' = 'stripe'
                       and not recon.dashboard_refund_mail_on())
    execute function recon.skip_outbox_row();
