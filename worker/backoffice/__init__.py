"""The back office: refunds the shop starts (rule 11) and what it is told (rule 12).

    POST /v1/refunds ─▶ api.py ─▶ service.py: the request committed with the cap checked under the
                                  payments' locks (store.py) ─▶ submit.py: one Stripe refund per
                                  payment, after the commit (stripe_refunds.py)
    worker loops (runtime.py): recovery of requests a crash left behind (submit.py), and the two
                                  outboxes: buyer e-mail (mail.py) and host webhooks (host_webhooks.py)

The webhook Stripe sends for each refund is booked by the rules like any other (handlers/refunds.py
links it to its request by metadata); the outbox rows are written by the database in the
transaction of the change that causes them (schema/0005_back_office.sql).
"""
