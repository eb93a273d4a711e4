"""Logging configured once: JSON lines by default, console for humans (LOG_FORMAT).

Two paths to one output. The project's own lines go straight from structlog to stdout (a line per
webhook and per event: the standard library's logging machinery is not on that path). Every other
record — aiohttp, aio-pika, aiormq, stripe, asyncio, warnings — goes through the standard library
to one handler whose ``ProcessorFormatter`` renders it with the same level, logger, timestamp,
redaction and renderer, so a log pipeline that parses JSON reads every line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping, Sequence
from types import TracebackType
from typing import Any

import orjson
import structlog

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+\.[\w.-]+")  # starts at a run's start: linear
# Underscores too: a secret like whsec_test_6f1c… must not keep its tail.
_SECRET = re.compile(r"(whsec_|sk_live_|sk_test_|rk_live_|rk_test_)[A-Za-z0-9_]+")
# scheme://user:password@host: the password runs to the last '@' before the host, and may hold
# anything but whitespace and '/', an unescaped '@' included (a '/' means a path: a URL without a
# password). The lookbehind keeps a long run of scheme characters from being tried at every offset.
_URL_PASSWORD = re.compile(
    r"(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^\s/]*?@(?=[^@]*$|[^@\s]*[\s/])", re.IGNORECASE
)

# Libraries whose INFO lines are routine chatter: stripe writes two per API request (with the URL),
# aio-pika and aiormq one per queue or channel closing and per reconnect. They are shown at debug;
# their warnings and errors (a failed reconnect, a broker-side close) stay what they are.
CHATTY_LIBRARIES = ("stripe", "aio_pika", "aiormq")
FORMATS = ("auto", "json", "console")


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no e-mail address, Stripe secret or URL password leaves the process in
    a log line, at any depth of the values."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            # The substring tests are cheap and rule out nearly every value (ids, types, outcomes).
            if "@" in value or "k_" in value or "whsec_" in value:
                event_dict[key] = _scrubbed(value)
        elif isinstance(value, dict | list | tuple):
            event_dict[key] = _scrubbed(value)
    return event_dict


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        if "@" in value:
            # A URL's password first: the e-mail pattern would take only part of it.
            value = _URL_PASSWORD.sub(r"\1[redacted]@", value) if "://" in value else value
            value = _EMAIL.sub("[email]", value)
        if "k_" in value or "whsec_" in value:
            value = _SECRET.sub(r"\1[redacted]", value)
        return value
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    return value


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


class StdoutHandler(logging.Handler):
    """The standard library's records, formatted, to ``sys.stdout`` as it is at write time (as
    StdoutLogger, and for the same reason: logging.StreamHandler keeps the stream it was given)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stdout
            stream.write(line + "\n")  # one write: a thread's line is never split by another's
            stream.flush()
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


class DemoteChatter(logging.Filter):
    """Shows routine library records at debug, and lets a record through only at ``level`` or above
    (a handler's own level is checked before its filters run, so the filter checks again).

    Routine: the INFO records of CHATTY_LIBRARIES, whose loggers let INFO through only when
    LOG_LEVEL is debug (at info those records are never made), and aiohttp's traceback for a
    request that is not valid HTTP — a scanner's garbage on a public port is the client's error,
    not the server's (aiohttp itself logs a bad method at debug for that reason).
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and _routine(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self._level


def _routine(record: logging.LogRecord) -> bool:
    if record.levelno == logging.INFO and record.name.partition(".")[0] in CHATTY_LIBRARIES:
        return True
    if record.name != "aiohttp.server" or not record.exc_info:
        return False
    error = record.exc_info[1]
    # By module and code, not isinstance: importing aiohttp here would charge every command for it.
    code = getattr(error, "code", None)
    return type(error).__module__ == "aiohttp.http_exceptions" and isinstance(code, int) and code < 500


def _orjson_text(obj: Any, **kwargs: Any) -> str:
    """structlog's JSON serializer: orjson (a line per event and per webhook; ~5× json.dumps)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, **kwargs).decode()


def _stdout_logger(*args: Any) -> StdoutLogger:
    """Every module logs through ``structlog.get_logger(__name__)``: the name is the first argument."""
    return StdoutLogger(str(args[0]) if args else "recon")


def resolve_format(log_format: str) -> str:
    """``auto`` (LOG_FORMAT unset) is the console renderer on a terminal and JSON everywhere else,
    as structlog's own defaults do: a service manager, a container or a pipe gets JSON."""
    if log_format != "auto":
        return log_format
    isatty = getattr(sys.stdout, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def _renderer(log_format: str) -> structlog.typing.Processor:
    if log_format == "console":
        # Exceptions reach it as text already (format_exc_info, then redact): it prints them as such.
        return structlog.dev.ConsoleRenderer()
    return structlog.processors.JSONRenderer(serializer=_orjson_text)


def _route_standard_library(level: int, tail: Sequence[structlog.typing.Processor]) -> None:
    """One handler on the root logger renders every foreign record through ``tail``."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = StdoutHandler()
    handler.setFormatter(formatter)
    handler.addFilter(DemoteChatter(level))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level <= logging.DEBUG else max(level, logging.WARNING)
        )
    # warnings.warn() prints two lines of text on stderr; as records they become one JSON line.
    # Off first: captureWarnings(True) does nothing while it believes it is on, even after
    # warnings.catch_warnings (pytest's, for one) has put the original printer back.
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    """A crash's traceback as one record (one JSON line), not as text on stderr."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("recon").critical("uncaught_exception", exc_info=(kind, value, traceback))


def configure_logging(log_format: str = "json", log_level: str = "info", cache_loggers: bool = False) -> None:
    """``log_format`` is one of FORMATS. ``cache_loggers`` for a server process, which configures
    once and then logs a line per webhook and per event: each module's logger then binds once
    instead of on every call (docs/performance.md has the figure). Not for commands run in-process
    by tests, which configure again."""
    level = getattr(logging, log_level.upper())
    tail: list[structlog.typing.Processor] = [
        structlog.processors.format_exc_info,
        redact,
        _renderer(resolve_format(log_format)),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stdout_logger,
        # A logger cached before a later configure() (tests, `recon` called in-process) would
        # keep the old processors, and structlog.testing.capture_logs would miss its lines.
        cache_logger_on_first_use=cache_loggers,
    )
    _route_standard_library(level, tail)
    sys.excepthook = _log_uncaught
