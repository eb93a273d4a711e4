"""Log lines: redacted, one JSON object each (ours and every library's), console on a terminal."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from typing import Any

import pytest
import structlog

from worker.logs import configure_logging, redact


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("refund for jenny.rosen@example.com", "refund for [email]"),
        ("key sk_live_51Habc123 rejected", "key sk_live_[redacted] rejected"),
        ("rk_test_9zz and whsec_abcDEF1", "rk_test_[redacted] and whsec_[redacted]"),
        ("a+b@x.io paid with sk_test_1", "[email] paid with sk_test_[redacted]"),
        ("secret whsec_test_6f1c0b2e, next", "secret whsec_[redacted], next"),
        ("evt_1NG8Du2eZvKYlo2CUI79vXWy", "evt_1NG8Du2eZvKYlo2CUI79vXWy"),
        ("charge.refund.updated", "charge.refund.updated"),
        ("amqp://recon:S3cr#et@rabbitmq:5672/ refused", "amqp://recon:[redacted]@rabbitmq:5672/ refused"),
        ("postgresql://recon:p@ss@postgres/recon", "postgresql://recon:[redacted]@postgres/recon"),
        ("dsn postgresql://u:pw@h/db for x@y.com", "dsn postgresql://u:[redacted]@h/db for [email]"),
    ],
)
def test_redacts_emails_and_secrets_and_nothing_else(value: str, expected: str) -> None:
    """Each value is scrubbed of e-mail addresses and Stripe secrets; ids and types pass unchanged."""
    event = {"event": "x", "detail": value, "count": 3}
    assert redact(None, "info", event) == {"event": "x", "detail": expected, "count": 3}


def test_nested_values_are_redacted_too() -> None:
    """A detail dict or a list of them is scrubbed at every depth; other values keep their types."""
    event = {"detail": {"to": "x@y.com", "keys": ["sk_live_abc", 3]}, "parts": ({"n": 1},)}
    assert redact(None, "info", event) == {
        "detail": {"to": "[email]", "keys": ["sk_live_[redacted]", 3]},
        "parts": [{"n": 1}],
    }


def test_every_line_names_the_module_that_logged_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Loggers are made with structlog.get_logger(__name__): the module's name is the ``logger``
    field of each JSON line."""
    from worker.consume import settle
    from worker.intake import receiver

    configure_logging("json", "info")
    receiver.log.info("probe_receiver")
    settle.log.warning("probe_settle")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["event"], line["logger"]) for line in lines] == [
        ("probe_receiver", "worker.intake.receiver"),
        ("probe_settle", "worker.consume.settle"),
    ]


class _Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def _bad_http_line() -> BaseException:
    """What aiohttp's parser raises for an over-long header line (a client's error)."""
    from aiohttp.http_exceptions import LineTooLong

    return LineTooLong("header", "8190", "9000")


def test_library_records_are_json_lines_with_the_same_fields_and_redaction() -> None:
    """A record of the standard library's logging (any library's) is one JSON object with level,
    logger, event and timestamp; its exception is a field of that object, not lines of traceback;
    secrets and e-mail addresses in the message or the traceback are redacted."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        configure_logging("json", "info")
        logging.getLogger("aiormq.connection").warning("closed by jenny.rosen@example.com")
        try:
            raise ValueError("bad key sk_test_51Habc123")
        except ValueError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
    [warning, error] = _json_lines(out.getvalue())
    assert warning["event"] == "closed by [email]"
    assert (warning["level"], warning["logger"]) == ("warning", "aiormq.connection")
    assert {"level", "logger", "event", "timestamp"} <= set(error) and error["level"] == "error"
    assert "ValueError: bad key sk_test_[redacted]" in error["exception"]
    assert "sk_test_51" not in out.getvalue()


def test_library_chatter_is_debug_and_hidden_at_info() -> None:
    """stripe's per-request INFO lines, aio-pika's and aiormq's INFO lines and aiohttp's traceback
    for a request that is not valid HTTP are debug lines: absent at LOG_LEVEL=info, labelled debug
    at LOG_LEVEL=debug. A library's warning stays a warning."""

    def chatter() -> None:
        logging.getLogger("stripe").info("message='Request to Stripe api' method=get")
        logging.getLogger("aio_pika.robust_connection").info("Connection closed. Reconnecting")
        logging.getLogger("aiohttp.server").error("Error handling request", exc_info=_bad_http_line())
        logging.getLogger("aio_pika.robust_connection").warning("Connection attempt failed")

    at_info, at_debug = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(at_info):
        configure_logging("json", "info")
        chatter()
    with contextlib.redirect_stdout(at_debug):
        configure_logging("json", "debug")
        chatter()
    assert [(r["logger"], r["level"]) for r in _json_lines(at_info.getvalue())] == [
        ("aio_pika.robust_connection", "warning")
    ]
    assert [(r["logger"], r["level"]) for r in _json_lines(at_debug.getvalue())] == [
        ("stripe", "debug"),
        ("aio_pika.robust_connection", "debug"),
        ("aiohttp.server", "debug"),
        ("aio_pika.robust_connection", "warning"),
    ]


def test_a_server_error_in_aiohttp_stays_an_error() -> None:
    """Only a client's malformed request is demoted: aiohttp's log of a handler that raised is an
    error line with its exception."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        configure_logging("json", "info")
        try:
            raise RuntimeError("handler broke")
        except RuntimeError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
    [line] = _json_lines(out.getvalue())
    assert line["level"] == "error" and "RuntimeError: handler broke" in line["exception"]


def test_library_lines_go_to_stdout_as_it_is_when_written() -> None:
    """The handler looks sys.stdout up at each write: a stdout swapped after configure_logging
    (pytest's capture, a daemon's redirection) gets the line, the old one does not."""
    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(first):
        configure_logging("json", "info")
    with contextlib.redirect_stdout(second):
        logging.getLogger("aiohttp.server").warning("probe")
    assert first.getvalue() == ""
    assert _json_lines(second.getvalue())[0]["event"] == "probe"


def test_the_projects_own_lines_bypass_the_standard_library() -> None:
    """structlog's lines (one per webhook, one per event) are written by structlog alone: a handler
    on the standard library's root logger never sees them."""
    seen: list[logging.LogRecord] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        configure_logging("json", "info")
        logging.getLogger().addHandler(Spy())
        structlog.get_logger("worker.consume.settle").info("event_handled", event_id="evt_1")
    assert _json_lines(out.getvalue())[0]["event"] == "event_handled"
    assert seen == []


def test_warnings_become_log_lines() -> None:
    """warnings.warn() output is a JSON line of logger py.warnings, not two lines of text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging("json", "info")
        warnings.warn("deprecated knob", UserWarning, stacklevel=1)
    [line] = _json_lines(out.getvalue())
    assert (line["logger"], line["level"]) == ("py.warnings", "warning")
    assert "deprecated knob" in line["event"]


@pytest.mark.parametrize(
    ("log_format", "terminal", "json_expected"),
    [("auto", True, False), ("auto", False, True), ("json", True, True), ("console", False, False)],
)
def test_auto_is_the_console_on_a_terminal_and_json_elsewhere(
    log_format: str, terminal: bool, json_expected: bool
) -> None:
    """LOG_FORMAT unset (auto) renders for humans when stdout is a terminal and JSON otherwise (a
    pipe, a file, a container's log); an explicit json or console wins either way."""
    out = _Terminal() if terminal else io.StringIO()
    with contextlib.redirect_stdout(out):
        configure_logging(log_format, "info")
        structlog.get_logger("worker.x").info("probe_line", order_number="ORD-1")
        logging.getLogger("aiohttp.server").warning("probe_foreign")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    if json_expected:
        assert [json.loads(line)["event"] for line in lines] == ["probe_line", "probe_foreign"]
    else:
        assert not lines[0].startswith("{") and "probe_line" in lines[0] and "ORD-1" in lines[0]
        assert "probe_foreign" in lines[1] and "aiohttp.server" in lines[1]
