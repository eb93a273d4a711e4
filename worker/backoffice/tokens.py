"""Which back-office token was given: the one check the API's bearer header and the console's
sign-in share."""

from __future__ import annotations

import hmac


def token_name_of(tokens: tuple[tuple[str, str], ...], given: str) -> str | None:
    """The name of ``given`` among RECON_API_TOKENS, compared in constant time with every configured
    token (no early exit that would tell how many matched); None for an unknown or empty token."""
    if not given:
        return None
    presented = given.encode()
    found = None
    for name, token in tokens:
        if hmac.compare_digest(presented, token.encode()):
            found = name
    return found
