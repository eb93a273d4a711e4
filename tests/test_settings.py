"""Settings come from the environment with the documented defaults; bad values are one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.settings import Settings, SettingsError


def test_defaults_match_the_contract() -> None:
    """With nothing set, every default is the documented one (docs/operations.md)."""
    s = Settings.from_env({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/recon"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.webhook_secrets == ()
    assert (s.webhook_tolerance_s, s.livemode, s.stripe_api_key) == (300, None, None)
    assert (s.http_host, s.http_port, s.worker_http_port) == ("127.0.0.1", 8080, 8081)
    assert (s.max_body_bytes, s.worker_concurrency, s.max_attempts) == (1_048_576, 32, 8)
    assert s.unmatched_retry_s == 3600
    assert s.retry_delays_s == (5.0, 30.0, 120.0, 600.0, 1800.0)
    assert (s.api_host, s.api_port, s.api_tokens, s.api_enabled) == ("127.0.0.1", 8082, (), False)
    assert (s.smtp_url, s.mail_from, s.notify_dashboard_refunds) == (None, "refunds@localhost", False)
    assert (s.host_webhook_url, s.host_webhook_secret) == (None, None)
    assert (s.console_session_s, s.verify_interval_s) == (28800, 0)
    assert (s.log_format, s.log_level) == ("auto", "info")  # auto: console on a terminal, else JSON


def test_retry_delays_and_api_tokens_are_parsed() -> None:
    """RECON_RETRY_DELAYS_S is ascending seconds; RECON_API_TOKENS takes name:token or a bare token,
    and neither the tokens nor the SMTP URL (which may hold a password) show in repr."""
    s = Settings.from_env(
        {
            "RECON_RETRY_DELAYS_S": "0.5, 2,10",
            "RECON_API_TOKENS": "ana:tok_ana_0123456789abcdef, tok_bare_0123456789abcdef",
            "SMTP_URL": "smtp://user:pw@mail:25",
            "RECON_NOTIFY_DASHBOARD_REFUNDS": "true",
        }
    )
    assert s.retry_delays_s == (0.5, 2.0, 10.0)
    assert s.api_tokens == (("ana", "tok_ana_0123456789abcdef"), ("token-2", "tok_bare_0123456789abcdef"))
    assert s.api_enabled and s.notify_dashboard_refunds
    assert "tok_" not in repr(s) and "pw@" not in repr(s)


@pytest.mark.parametrize(
    ("raw", "livemode", "notify"),
    [("true", True, True), ("1", True, True), ("no", False, False), ("FALSE", False, False)],
)
def test_yes_and_no_values_are_read_in_their_spellings(raw: str, livemode: bool, notify: bool) -> None:
    """STRIPE_LIVEMODE and RECON_NOTIFY_DASHBOARD_REFUNDS take true/1/yes and false/0/no, any case."""
    s = Settings.from_env({"STRIPE_LIVEMODE": raw, "RECON_NOTIFY_DASHBOARD_REFUNDS": raw})
    assert (s.livemode, s.notify_dashboard_refunds) == (livemode, notify)


def test_the_receiver_requires_a_webhook_secret() -> None:
    """Settings without STRIPE_WEBHOOK_SECRETS load, but the receiver's check refuses them in words;
    with one it passes."""
    with pytest.raises(SettingsError, match="STRIPE_WEBHOOK_SECRETS is not set"):
        Settings.from_env({}).require_webhook_secrets()
    Settings.from_env({"STRIPE_WEBHOOK_SECRETS": "whsec_a"}).require_webhook_secrets()


def test_secrets_are_split_and_hidden_from_repr() -> None:
    """Several secrets mean rotation; repr never shows them."""
    s = Settings.from_env({"STRIPE_WEBHOOK_SECRETS": "whsec_a, whsec_b", "STRIPE_API_KEY": "sk_test_x"})
    assert s.webhook_secrets == ("whsec_a", "whsec_b")
    assert "whsec_" not in repr(s) and "sk_test" not in repr(s)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write",
        "postgresql:///recon?host=/var/run/postgresql",
        "postgresql://recon@[::1]/recon",
        "postgresql://recon:p%23ss@db:5432/recon",
    ],
)
def test_service_urls_that_parse_are_taken_as_given(url: str) -> None:
    """Several hosts, a socket directory, IPv6 and a percent-encoded password are all fine."""
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RECON_HTTP_PORT": "eighty"}, "RECON_HTTP_PORT"),
        ({"STRIPE_LIVEMODE": "maybe"}, "STRIPE_LIVEMODE"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"STRIPE_WEBHOOK_SECRETS": "nope"}, "whsec_"),
        ({"RECON_MAX_ATTEMPTS": "0"}, "RECON_MAX_ATTEMPTS"),
        ({"RECON_RETRY_DELAYS_S": "30,5"}, "ascending"),
        ({"RECON_RETRY_DELAYS_S": "5,soon"}, "RECON_RETRY_DELAYS_S"),
        ({"RECON_API_TOKENS": "ana:nope"}, "RECON_API_TOKENS"),
        ({"SMTP_URL": "mail.example:25"}, "SMTP_URL"),
        ({"RECON_HOST_WEBHOOK_URL": "https://shop.example/hooks"}, "RECON_HOST_WEBHOOK_SECRET"),
        ({"RECON_NOTIFY_DASHBOARD_REFUNDS": "maybe"}, "RECON_NOTIFY_DASHBOARD_REFUNDS"),
        ({"RECON_HOST_WEBHOOK_URL": "shop.example/hooks"}, "RECON_HOST_WEBHOOK_URL must be an http"),
        # A password with an unescaped '#', '/' or '?' cuts the host part short: the port is then a
        # piece of the password, which the clients used to print in their error.
        ({"DATABASE_URL": "postgresql://recon:nope#tail@db:5432/recon"}, "DATABASE_URL is not a valid URL"),
        ({"AMQP_URL": "amqp://recon:nope/x@mq:5672/"}, "AMQP_URL is not a valid URL"),
        ({"SMTP_URL": "smtp://mail:nope?x@mail.example:587"}, "SMTP_URL is not a valid URL"),
        ({"DATABASE_URL": "mysql://recon:nope@db/recon"}, "DATABASE_URL must start with postgresql://"),
        ({"DATABASE_URL": "postgresql://recon:1234#nope@db/recon"}, "DATABASE_URL is not a valid URL"),
    ],
)
def test_bad_values_raise_settings_error(env: dict[str, str], needle: str) -> None:
    """A malformed value names the variable and never echoes a secret."""
    with pytest.raises(SettingsError, match=needle) as err:
        Settings.from_env(env)
    assert "nope" not in str(err.value)


def _recon(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "env_extra"),
    [
        (("receiver",), {}),  # no STRIPE_WEBHOOK_SECRETS
        (("run",), {}),
        (("receiver",), {"RECON_HTTP_PORT": "x"}),
        (("report", "--since", "yesterday"), {}),
        (("no-such-command",), {}),
    ],
)
def test_cli_bad_settings_exit_2_with_one_line(
    args: tuple[str, ...], env_extra: dict[str, str], tmp_path
) -> None:
    """A missing or bad setting or argument exits 2 with exactly one line on stderr."""
    import os

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env_extra}
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr
