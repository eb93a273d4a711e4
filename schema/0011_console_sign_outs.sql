-- A console session is a signed cookie that every replica accepts without a session store (the
-- token that signed in is its key). Signing out deleted only the browser's copy, so a copied cookie
-- stayed good until it expired (RECON_CONSOLE_SESSION_S, 8 hours by default). Signing out now
-- records the session here until its own expiry, and the console refuses a recorded session.
-- Kept: a digest of the cookie's random nonce (the cookie itself, without its signature key, is no
-- use to anyone reading this table, but there is no reason to keep more).

create table recon.console_sign_outs (
    session_digest text primary key,
    expires_at timestamptz not null
);
