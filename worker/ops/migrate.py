"""``recon migrate``: apply schema/NNNN_*.sql in order, once each, under an advisory lock."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# Any constant works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_KEY = 7_215_340_118


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    files = sorted(
        (f for f in resources.files("schema").iterdir() if f.name.endswith(".sql")), key=lambda f: f.name
    )
    return [Migration(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def _split_database(database_url: str) -> tuple[str, str]:
    """(name of the database, URL of the maintenance database `postgres` on the same server)."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/") or "postgres"
    return name, urlunsplit(parts._replace(path="/postgres"))


async def create_database(database_url: str) -> bool:
    """Create the database if missing; True if this call created it. Safe against a concurrent creator."""
    name, maintenance_url = _split_database(database_url)
    con = await asyncpg.connect(maintenance_url)
    try:
        if await con.fetchval("select 1 from pg_database where datname = $1", name):
            return False
        try:
            # Identifiers cannot be parameters; quote_ident does the quoting server-side.
            quoted = await con.fetchval("select quote_ident($1)", name)
            await con.execute(f"create database {quoted}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another process won the race: 42P04 if its commit was visible to our check in
            # CREATE DATABASE, 23505 on pg_database's unique index if it committed just after.
            return False
        return True
    finally:
        await con.close()


async def apply_migrations(database_url: str) -> list[str]:
    """Apply pending migrations; returns the versions this call applied."""
    con = await asyncpg.connect(database_url)
    applied: list[str] = []
    try:
        await con.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await con.execute(
                """
                create schema if not exists recon;
                create table if not exists recon.schema_migrations (
                    version text primary key,
                    checksum text not null,
                    applied_at timestamptz not null default now()
                )
                """
            )
            done = {
                r["version"]: r["checksum"]
                for r in await con.fetch("select version, checksum from recon.schema_migrations")
            }
            for migration in load_migrations():
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        log.warning("migration_changed_after_apply", version=migration.version)
                    continue
                async with con.transaction():
                    await con.execute(migration.sql)
                    await con.execute(
                        "insert into recon.schema_migrations (version, checksum) values ($1, $2)",
                        migration.version,
                        migration.checksum,
                    )
                applied.append(migration.version)
                log.info("migration_applied", version=migration.version)
        finally:
            await con.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await con.close()
    return applied
