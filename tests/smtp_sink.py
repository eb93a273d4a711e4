"""A real SMTP server in-process (aiosmtpd), collecting what it is sent, for the buyer e-mails."""

from __future__ import annotations

import email
import email.policy
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class SmtpSink:
    """aiosmtpd's handler: every DATA becomes one parsed message (with its envelope recipients)."""

    messages: list[EmailMessage] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


@contextmanager
def smtp_sink(port: int, tls_context: ssl.SSLContext | None = None) -> Iterator[SmtpSink]:
    """An SMTP server on 127.0.0.1:``port`` (aiosmtpd runs it in a thread of its own); with
    ``tls_context`` it offers STARTTLS."""
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=port, tls_context=tls_context)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()
