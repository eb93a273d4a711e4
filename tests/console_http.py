"""What the console's HTTP tests share: the back-office API app served, a client signed in the way a
browser signs in (the login form's CSRF cookie, then the session cookie), and the forms it posts."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from tests.backoffice_setup import NOWHERE, OPS_TOKEN, TOKENS, api_served, with_stripe
from worker.backoffice.console import session
from worker.settings import Settings

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


@dataclass
class Console:
    http: aiohttp.ClientSession
    url: str
    csrf: str

    async def get(self, path: str) -> tuple[int, str, str]:
        """Status, body and Location (redirects not followed)."""
        async with self.http.get(self.url + path, allow_redirects=False) as response:
            return response.status, await response.text(), response.headers.get("Location", "")

    async def post(self, path: str, fields: dict[str, str]) -> tuple[int, str, str]:
        """A form POST carrying the session's CSRF token unless ``fields`` names its own."""
        body = {"csrf": self.csrf, **fields}
        async with self.http.post(self.url + path, data=body, allow_redirects=False) as response:
            return response.status, await response.text(), response.headers.get("Location", "")


async def sign_in(http: aiohttp.ClientSession, url: str, token: str = OPS_TOKEN) -> tuple[int, str]:
    """The login form read for its CSRF token, then posted with ``token``: status and Location."""
    async with http.get(f"{url}/console/login?next=/console/payouts") as response:
        page = await response.text()
    match = _CSRF.search(page)
    assert match, page
    form = {"csrf": match.group(1), "next": "/console/payouts", "token": token}
    async with http.post(f"{url}/console/login", data=form, allow_redirects=False) as response:
        return response.status, response.headers.get("Location", "")


def signed_in(http: aiohttp.ClientSession, url: str) -> Console:
    """The console as ``http`` sees it after a sign-in as ``ops``: the CSRF token of its session."""
    cookie = next(c.value for c in http.cookie_jar if c.key == session.SESSION_COOKIE)
    active = session.read(TOKENS, cookie, time.time())
    assert active is not None and active.operator == "ops"
    return Console(http, url, active.csrf)


@asynccontextmanager
async def console(settings: Settings, api_base: str = NOWHERE) -> AsyncIterator[Console]:
    """The API served (Stripe at ``api_base``), and a client signed in as ``ops`` that keeps its cookies."""
    async with (
        api_served(with_stripe(settings, api_base)) as url,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        status, location = await sign_in(http, url)
        assert (status, location) == (303, "/console/payouts")
        yield signed_in(http, url)
