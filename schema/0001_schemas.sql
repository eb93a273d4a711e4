-- The two fixed schemas (CONTRACT §5-6) and the read-only finance role.
create schema if not exists recon;
create schema if not exists finance;

-- Roles are cluster-wide: another database on the same server may have created it already,
-- possibly at this very moment.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'recon_finance') then
        create role recon_finance nologin;
    end if;
exception when duplicate_object or unique_violation then
    null;
end
$$;

revoke all on schema recon from recon_finance;
grant usage on schema finance to recon_finance;
alter default privileges in schema finance grant select on tables to recon_finance;
