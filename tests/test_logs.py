"""The redaction step: no e-mail address or Stripe secret leaves the process in a log line."""

from __future__ import annotations

import pytest

from worker.logs import redact


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("refund for jenny.rosen@example.com", "refund for [email]"),
        ("key sk_live_51Habc123 rejected", "key sk_live_[redacted] rejected"),
        ("rk_test_9zz and whsec_abcDEF1", "rk_test_[redacted] and whsec_[redacted]"),
        ("a+b@x.io paid with sk_test_1", "[email] paid with sk_test_[redacted]"),
        ("evt_1NG8Du2eZvKYlo2CUI79vXWy", "evt_1NG8Du2eZvKYlo2CUI79vXWy"),
        ("charge.refund.updated", "charge.refund.updated"),
    ],
)
def test_redacts_emails_and_secrets_and_nothing_else(value: str, expected: str) -> None:
    event = {"event": "x", "detail": value, "count": 3}
    assert redact(None, "info", event) == {"event": "x", "detail": expected, "count": 3}


def test_every_line_names_the_module_that_logged_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Loggers are made with structlog.get_logger(__name__): the module's name is the ``logger``
    field of each JSON line."""
    import json

    from worker.consume import settle
    from worker.intake import receiver
    from worker.logs import configure_logging

    configure_logging("json", "info")
    receiver.log.info("probe_receiver")
    settle.log.warning("probe_settle")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["event"], line["logger"]) for line in lines] == [
        ("probe_receiver", "worker.intake.receiver"),
        ("probe_settle", "worker.consume.settle"),
    ]
