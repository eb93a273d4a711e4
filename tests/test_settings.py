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
    assert (s.log_format, s.log_level) == ("json", "info")


def test_secrets_are_split_and_hidden_from_repr() -> None:
    """Several secrets mean rotation; repr never shows them."""
    s = Settings.from_env({"STRIPE_WEBHOOK_SECRETS": "whsec_a, whsec_b", "STRIPE_API_KEY": "sk_test_x"})
    assert s.webhook_secrets == ("whsec_a", "whsec_b")
    assert "whsec_" not in repr(s) and "sk_test" not in repr(s)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RECON_HTTP_PORT": "eighty"}, "RECON_HTTP_PORT"),
        ({"STRIPE_LIVEMODE": "maybe"}, "STRIPE_LIVEMODE"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"STRIPE_WEBHOOK_SECRETS": "nope"}, "whsec_"),
        ({"RECON_MAX_ATTEMPTS": "0"}, "RECON_MAX_ATTEMPTS"),
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
