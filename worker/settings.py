"""Settings: one frozen dataclass built from the environment (docs/operations.md, "Settings", lists them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/recon"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Waits between retries of an event that cannot apply yet (RECON_RETRY_DELAYS_S); the last one
# repeats until RECON_UNMATCHED_RETRY_S runs out.
DEFAULT_RETRY_DELAYS_S = (5.0, 30.0, 120.0, 600.0, 1800.0)
# PostgreSQL session settings the outbox triggers read: "off" queues no host webhook (schema 0007),
# no buyer e-mail about a refund made outside the app (0008).
HOST_WEBHOOKS_SESSION_SETTING = "recon.host_webhooks"
DASHBOARD_REFUND_MAIL_SESSION_SETTING = "recon.dashboard_refund_mail"


class SettingsError(Exception):
    """A setting is missing or malformed; the CLI prints it as one line and exits 2."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _livemode(env: Mapping[str, str]) -> bool | None:
    raw = env.get("STRIPE_LIVEMODE", "").strip().lower()
    if raw == "":
        return None
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise SettingsError(f"STRIPE_LIVEMODE must be true or false, got {raw!r}")


def _secrets(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("STRIPE_WEBHOOK_SECRETS", "")
    secrets = tuple(s.strip() for s in raw.split(",") if s.strip())
    for secret in secrets:
        if not secret.startswith("whsec_"):
            # Never echo the value: it is a secret even when malformed.
            raise SettingsError("STRIPE_WEBHOOK_SECRETS entries must start with whsec_")
    return secrets


def _retry_delays(env: Mapping[str, str]) -> tuple[float, ...]:
    raw = env.get("RECON_RETRY_DELAYS_S", "").strip()
    if not raw:
        return DEFAULT_RETRY_DELAYS_S
    try:
        delays = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise SettingsError(f"RECON_RETRY_DELAYS_S must be comma-separated seconds, got {raw!r}") from None
    if not delays or any(d <= 0 for d in delays) or list(delays) != sorted(delays):
        raise SettingsError("RECON_RETRY_DELAYS_S must be positive and ascending")
    return delays


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _api_tokens(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """RECON_API_TOKENS: ``name:token`` or a bare token (named ``token-N``), comma-separated."""
    pairs: list[tuple[str, str]] = []
    for index, part in enumerate(p.strip() for p in env.get("RECON_API_TOKENS", "").split(",")):
        if not part:
            continue
        name, sep, token = part.partition(":")
        if not sep:
            name, token = f"token-{index + 1}", part
        if not name.strip() or len(token.strip()) < 16:
            # Never echo the value: a token is a secret even when malformed.
            raise SettingsError("RECON_API_TOKENS entries must be name:token with a token of 16+ characters")
        pairs.append((name.strip(), token.strip()))
    return tuple(pairs)


def _service_url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    """``raw`` when it is a URL of one of ``schemes`` whose host and port parse. A password with an
    unescaped '#', '/' or '?' ends the host part early, and the clients then fail with a piece of the
    password in their error, which a log line would carry: the URL is refused here, never echoed."""
    if not raw.startswith(tuple(f"{scheme}://" for scheme in schemes)):
        raise SettingsError(f"{name} must start with {' or '.join(f'{s}://' for s in schemes)}")
    try:
        parts = urlsplit(raw)
        # A password cut short leaves its '@' (and the host) out of the authority.
        cut = "@" in raw.split("?", 1)[0] and "@" not in parts.netloc
        if cut:
            raise ValueError
        if "," not in parts.netloc:  # several hosts (PostgreSQL's multi-host form): each has its port
            parts.port  # noqa: B018 - parsing is the check
    except ValueError:
        raise SettingsError(
            f"{name} is not a valid URL (percent-encode '#', '/', '?' and '@' in the user and password)"
        ) from None
    return raw


def _smtp_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("SMTP_URL", "").strip()
    if not raw:
        return None
    return _service_url("SMTP_URL", raw, ("smtp", "smtps"))


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name} must be an http:// or https:// URL")
    return raw


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, default).strip().lower() or default
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    amqp_url: str = DEFAULT_AMQP_URL
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    webhook_tolerance_s: int = 300
    livemode: bool | None = None
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_api_base: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    worker_http_port: int = 8081
    max_body_bytes: int = 1_048_576
    worker_concurrency: int = 32
    max_attempts: int = 8
    unmatched_retry_s: int = 3600
    retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    api_host: str = "127.0.0.1"
    api_port: int = 8082
    # (name, token) pairs; empty = the back-office API and the console are off.
    api_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    smtp_url: str | None = field(default=None, repr=False)
    mail_from: str = "refunds@localhost"
    notify_dashboard_refunds: bool = False
    host_webhook_url: str | None = None
    host_webhook_secret: str | None = field(default=None, repr=False)
    console_session_s: int = 28800
    verify_interval_s: int = 0
    log_format: str = "auto"  # LOG_FORMAT unset: console on a terminal, else JSON (worker/logs.py)
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build from ``env`` (default: ``.env`` in the working directory, overridden by os.environ)."""
        if env is None:
            env = load_environment()
        return cls(
            database_url=_service_url(
                "DATABASE_URL", env.get("DATABASE_URL") or DEFAULT_DATABASE_URL, ("postgresql", "postgres")
            ),
            amqp_url=_service_url("AMQP_URL", env.get("AMQP_URL") or DEFAULT_AMQP_URL, ("amqp", "amqps")),
            webhook_secrets=_secrets(env),
            webhook_tolerance_s=_int(env, "STRIPE_WEBHOOK_TOLERANCE_S", 300, minimum=1),
            livemode=_livemode(env),
            stripe_api_key=env.get("STRIPE_API_KEY") or None,
            stripe_api_base=env.get("STRIPE_API_BASE") or None,
            http_host=env.get("RECON_HTTP_HOST") or "127.0.0.1",
            http_port=_int(env, "RECON_HTTP_PORT", 8080),
            worker_http_port=_int(env, "RECON_WORKER_HTTP_PORT", 8081),
            max_body_bytes=_int(env, "RECON_MAX_BODY_BYTES", 1_048_576, minimum=1),
            worker_concurrency=_int(env, "RECON_WORKER_CONCURRENCY", 32, minimum=1),
            max_attempts=_int(env, "RECON_MAX_ATTEMPTS", 8, minimum=1),
            unmatched_retry_s=_int(env, "RECON_UNMATCHED_RETRY_S", 3600, minimum=0),
            retry_delays_s=_retry_delays(env),
            api_host=env.get("RECON_API_HOST") or "127.0.0.1",
            api_port=_int(env, "RECON_API_PORT", 8082),
            api_tokens=_api_tokens(env),
            smtp_url=_smtp_url(env),
            mail_from=env.get("RECON_MAIL_FROM") or "refunds@localhost",
            notify_dashboard_refunds=_bool(env, "RECON_NOTIFY_DASHBOARD_REFUNDS", False),
            host_webhook_url=_http_url(env, "RECON_HOST_WEBHOOK_URL"),
            host_webhook_secret=env.get("RECON_HOST_WEBHOOK_SECRET") or None,
            console_session_s=_int(env, "RECON_CONSOLE_SESSION_S", 28800, minimum=60),
            verify_interval_s=_int(env, "RECON_VERIFY_INTERVAL_S", 0, minimum=0),
            log_format=_choice(env, "LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        )

    def __post_init__(self) -> None:
        if self.host_webhook_url and not self.host_webhook_secret:
            raise SettingsError(
                "RECON_HOST_WEBHOOK_URL is set without RECON_HOST_WEBHOOK_SECRET to sign with"
            )

    def database_session(self) -> dict[str, str]:
        """Session settings for the connections that change statuses (the lanes, the back office):
        the database queues no outbox row this process's senders would only mark skipped — no host
        webhooks without a host URL (schema 0007: those rows cost PostgreSQL about 40% of a drained
        event's work), no e-mail about a dashboard refund unless asked to send them (0008)."""
        session: dict[str, str] = {}
        if not self.host_webhook_url:
            session[HOST_WEBHOOKS_SESSION_SETTING] = "off"
        if not self.notify_dashboard_refunds:
            session[DASHBOARD_REFUND_MAIL_SESSION_SETTING] = "off"
        return session

    @property
    def api_enabled(self) -> bool:
        """The back-office API and the console listen only when tokens are set."""
        return bool(self.api_tokens)

    def require_webhook_secrets(self) -> None:
        if not self.webhook_secrets:
            raise SettingsError(
                "STRIPE_WEBHOOK_SECRETS is not set: the receiver refuses to start without a whsec_ secret"
            )


def load_environment(dotenv_path: Path | None = None) -> dict[str, str]:
    """The process environment over the values of ``.env`` (the environment wins)."""
    path = dotenv_path or Path.cwd() / ".env"
    from_file = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.exists() else {}
    return {**from_file, **os.environ}
