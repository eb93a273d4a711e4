"""The console's sign-in: a session cookie signed with the token that signed in, and the CSRF token
every form carries.

The cookie holds who (the token's name), until when, and a random nonce, signed with a key derived
from that name's token: no session store, every replica of the API accepts it, and changing or
removing a token in RECON_API_TOKENS ends its sessions. Signing out records the session's digest
in recon.console_sign_outs until it expires, and the guard refuses it from then on. The CSRF token
is derived from the session (its key and nonce), so a page of another site can neither read nor
guess it. Before sign-in, the
login form's CSRF token is a random value also set as a cookie (double submit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg
import orjson

SESSION_COOKIE = "recon_console"
# Expired sign-outs go as a new one is recorded: the table holds at most the sessions of the last
# RECON_CONSOLE_SESSION_S that were signed out.
_SIGN_OUT = """
with pruned as (delete from recon.console_sign_outs where expires_at < now())
insert into recon.console_sign_outs (session_digest, expires_at)
values ($1, to_timestamp($2))
on conflict (session_digest) do nothing
"""
_SIGNED_OUT = "select exists (select 1 from recon.console_sign_outs where session_digest = $1)"
LOGIN_COOKIE = "recon_console_login"
_SESSION_CONTEXT = b"recon-console-session-v1"


@dataclass(frozen=True, slots=True)
class Session:
    operator: str  # the token's name: who acts
    expires_at: int  # unix seconds
    csrf: str
    digest: str  # of the cookie's nonce: what a sign-out records (recon.console_sign_outs)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(tokens: tuple[tuple[str, str], ...], name: str) -> bytes | None:
    token = next((token for token_name, token in tokens if token_name == name), None)
    if token is None:
        return None
    return hmac.new(token.encode(), _SESSION_CONTEXT, hashlib.sha256).digest()


def _csrf(key: bytes, nonce: str) -> str:
    return hmac.new(key, b"csrf:" + nonce.encode(), hashlib.sha256).hexdigest()


def issue(tokens: tuple[tuple[str, str], ...], name: str, expires_at: int) -> str:
    """The cookie value of a session for the token named ``name`` (which must be configured)."""
    key = _key(tokens, name)
    if key is None:
        raise KeyError("no such token name")
    payload = _b64(orjson.dumps({"n": name, "e": expires_at, "r": secrets.token_urlsafe(16)}))
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def read(tokens: tuple[tuple[str, str], ...], cookie: str | None, now: float) -> Session | None:
    """The session in a cookie value; None when absent, forged, for a token no longer configured,
    or expired."""
    if not cookie or cookie.count(".") != 1:
        return None
    payload, signature = cookie.split(".")
    try:
        claims = orjson.loads(_unb64(payload))
        name, expires_at, nonce = claims["n"], claims["e"], claims["r"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(name, str) or not isinstance(expires_at, int) or not isinstance(nonce, str):
        return None
    key = _key(tokens, name)
    if key is None:
        return None
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected.encode(), signature.encode()) or expires_at <= now:
        return None
    return Session(name, expires_at, _csrf(key, nonce), hashlib.sha256(nonce.encode()).hexdigest())


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, given: str | None) -> bool:
    """A CSRF check in constant time; a missing side never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


async def sign_out(con: asyncpg.Connection, active: Session) -> None:
    """From now on ``active`` is refused, on every replica, until it would have expired anyway."""
    await con.execute(_SIGN_OUT, active.digest, active.expires_at)


async def signed_out(con: asyncpg.Connection, active: Session) -> bool:
    return bool(await con.fetchval(_SIGNED_OUT, active.digest))
