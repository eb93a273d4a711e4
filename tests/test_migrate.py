"""``recon migrate`` is idempotent and safe when several processes run it at once."""

from __future__ import annotations

import asyncio

import asyncpg

from tests import servers
from worker.ops import migrate


async def _schema_fingerprint(url: str) -> list[tuple[str, str, str]]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            """
            select table_schema, table_name, column_name from information_schema.columns
            where table_schema in ('recon', 'finance') order by 1, 2, 3
            """
        )
        return [tuple(r) for r in rows]
    finally:
        await con.close()


async def test_migrate_twice_applies_nothing_the_second_time() -> None:
    """A second run finds every migration applied and leaves the schema as it was."""
    name = f"recon_m_{servers.RUN_TAG.replace('-', '_')}_a"
    url = servers.database_url(name)
    try:
        assert await migrate.create_database(url) is True
        first = await migrate.apply_migrations(url)
        before = await _schema_fingerprint(url)
        assert first == [m.version for m in migrate.load_migrations()]
        assert await migrate.create_database(url) is False
        assert await migrate.apply_migrations(url) == []
        assert await _schema_fingerprint(url) == before
    finally:
        await servers.drop_database(name)


async def test_concurrent_create_and_migrate_end_in_one_schema() -> None:
    """Four processes' worth of create-db + migrate at once: one creator, each migration once."""
    name = f"recon_m_{servers.RUN_TAG.replace('-', '_')}_b"
    url = servers.database_url(name)

    async def one() -> list[str]:
        await migrate.create_database(url)
        return await migrate.apply_migrations(url)

    try:
        results = await asyncio.gather(*(one() for _ in range(4)))
        applied = sorted(v for r in results for v in r)
        assert applied == sorted(m.version for m in migrate.load_migrations())
        con = await asyncpg.connect(url)
        try:
            count = await con.fetchval("select count(*) from recon.schema_migrations")
        finally:
            await con.close()
        assert count == len(migrate.load_migrations())
    finally:
        await servers.drop_database(name)
