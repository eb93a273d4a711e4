"""structlog configured once: JSON lines by default, console for humans (LOG_FORMAT)."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_SECRET = re.compile(r"(whsec_|sk_live_|sk_test_|rk_live_|rk_test_)[A-Za-z0-9]+")


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no e-mail address or Stripe secret leaves the process in a log line."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            # The substring tests are cheap and rule out nearly every value (ids, types, outcomes).
            if "@" in value:
                value = event_dict[key] = _EMAIL.sub("[email]", value)
            if "k_" in value or "whsec_" in value:
                event_dict[key] = _SECRET.sub(r"\1[redacted]", value)
    return event_dict


class StdoutLogger:
    """Writes each line to ``sys.stdout`` as it is *now*; ``name`` is the module that logs.

    structlog's PrintLogger keeps the stream it was built with; a cached logger then outlives a
    swapped stdout (pytest's capture, a daemon's redirection) and writes to a closed file.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        print(message, file=sys.stdout, flush=True)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _orjson_text(obj: Any, **kwargs: Any) -> str:
    """structlog's JSON serializer: orjson (a line per event and per webhook; ~5× json.dumps)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, **kwargs).decode()


def _stdout_logger(*args: Any) -> StdoutLogger:
    """Every module logs through ``structlog.get_logger(__name__)``: the name is the first argument."""
    return StdoutLogger(str(args[0]) if args else "recon")


def configure_logging(log_format: str = "json", log_level: str = "info", cache_loggers: bool = False) -> None:
    """``cache_loggers`` for a server process, which configures once and then logs a line per
    webhook and per event: each module's logger then binds once instead of on every call
    (docs/performance.md has the figure). Not for commands run in-process by tests, which
    configure again."""
    level = getattr(logging, log_level.upper())
    logging.basicConfig(format="%(message)s", stream=sys.stdout, level=level, force=True)
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if log_format == "console"
        else structlog.processors.JSONRenderer(serializer=_orjson_text)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stdout_logger,
        # A logger cached before a later configure() (tests, `recon` called in-process) would
        # keep the old processors, and structlog.testing.capture_logs would miss its lines.
        cache_logger_on_first_use=cache_loggers,
    )
