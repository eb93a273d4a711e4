"""The buyer's refund e-mail: rendered from Jinja2 templates (text and HTML parts), sent over SMTP_URL.

The ``Message-ID`` is derived from the refund (``<refund.re_…@domain>``), so a resend after a crash
is the same message to any mail system that dedupes, and to a reader. Addresses never reach the logs.
"""

from __future__ import annotations

import email.errors
from dataclasses import dataclass
from decimal import Decimal
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import jinja2

from worker.backoffice.money import format_money
from worker.backoffice.outbox import DeliveryFailed, OutboxRow, Sent, Skipped

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("worker.backoffice", "templates"),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


_STARTTLS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class SmtpServer:
    host: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool  # smtps://: TLS from the first byte
    # smtp://: STARTTLS whenever the server offers it (None; the certificate is checked and there is
    # no falling back to clear), so a server that offers TLS gets the password and the buyer's
    # address only over it; ?starttls=true refuses a server that does not offer it, and
    # ?starttls=false never upgrades.
    start_tls: bool | None

    @classmethod
    def from_url(cls, url: str) -> SmtpServer:
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        query = parse_qs(parts.query)
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (465 if implicit else 25),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit,
            start_tls=False if implicit else _STARTTLS.get(query.get("starttls", [""])[0].lower()),
        )


def _owner_label(payload: dict[str, Any]) -> str:
    if payload.get("order_number"):
        return f"order {payload['order_number']}"
    return f"invoice {payload['invoice_number']}"


def build_refund_email(payload: dict[str, Any], mail_from: str) -> EmailMessage:
    """The message for one booked refund (the outbox row's payload)."""
    amount = format_money(Decimal(str(payload["amount_decimal"])), str(payload["currency"]))
    owner = _owner_label(payload)
    subject = f"Your refund of {amount} for {owner}"
    values = {
        "amount": amount,
        "owner_label": owner,
        "message": payload.get("message"),
        "refund_id": payload["refund_id"],
        "subject": subject,
    }
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = mail_from
    message["To"] = payload["to"]
    message["Date"] = formatdate(localtime=False)
    domain = mail_from.rpartition("@")[2] or "localhost"
    message["Message-ID"] = f"<refund.{payload['refund_id']}@{domain}>"
    message.set_content(_TEMPLATES.get_template("refund_email.txt.j2").render(values))
    message.add_alternative(_TEMPLATES.get_template("refund_email.html.j2").render(values), subtype="html")
    return message


def _buildable(payload: dict[str, Any], mail_from: str) -> EmailMessage:
    """The message, or a permanent failure when the host's data cannot make one: a line break in
    a header (the e-mail library refuses it: no header injection) or a To that is not exactly one
    address (a comma in buyer_email would send the refund's details to a second person)."""
    try:
        message = build_refund_email(payload, mail_from)
        recipients = message["To"].addresses
    except (ValueError, TypeError, AttributeError, email.errors.MessageError) as exc:  # no To at all
        raise DeliveryFailed(f"the message cannot be built ({type(exc).__name__})", permanent=True) from None
    if len(recipients) != 1 or not recipients[0].addr_spec or "@" not in recipients[0].addr_spec:
        raise DeliveryFailed(f"To is not one address ({len(recipients)} found)", permanent=True)
    return message


class MailDeliverer:
    """Sends the ``email`` outbox; with no SMTP_URL the rows are kept as recorded, not sent."""

    def __init__(
        self, smtp_url: str | None, mail_from: str, *, notify_dashboard_refunds: bool, timeout_s: float = 20.0
    ) -> None:
        self._server = SmtpServer.from_url(smtp_url) if smtp_url else None
        self._mail_from = mail_from
        self._notify_dashboard_refunds = notify_dashboard_refunds
        self._timeout_s = timeout_s

    async def deliver(self, row: OutboxRow) -> Sent | Skipped:
        if row.payload.get("source") == "stripe" and not self._notify_dashboard_refunds:
            return Skipped("a refund made outside the app (RECON_NOTIFY_DASHBOARD_REFUNDS is off)")
        if self._server is None:
            return Skipped("recorded, not sent: SMTP_URL is not set")
        server = self._server
        message = _buildable(row.payload, self._mail_from)
        try:
            await aiosmtplib.send(
                message,
                hostname=server.host,
                port=server.port,
                username=server.username,
                password=server.password,
                use_tls=server.use_tls,
                start_tls=server.start_tls,
                timeout=self._timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as refused:
            codes = [r.code for r in refused.recipients]
            raise DeliveryFailed(
                f"recipient refused ({codes})", permanent=all(c >= 500 for c in codes)
            ) from None
        except aiosmtplib.SMTPDataError as exc:
            # The server refused this message for good (5xx); its text may quote the address.
            raise DeliveryFailed(f"SMTP {exc.code} (message refused)", permanent=exc.code >= 500) from None
        except aiosmtplib.SMTPResponseException as exc:
            # Sender, authentication, greeting: the server's or our setup's trouble, not the
            # message's; it is kept and tried again, never dropped.
            raise DeliveryFailed(f"SMTP {exc.code} ({type(exc).__name__})") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"SMTP unavailable ({type(exc).__name__})") from None
        return Sent()
