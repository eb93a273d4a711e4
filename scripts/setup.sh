#!/usr/bin/env bash
# Sets up a machine for stripe-recon: PostgreSQL and RabbitMQ installed and running, the
# virtualenv installed, and (with "app") the database migrated and a dev webhook secret in .env.
# Usage: scripts/setup.sh [services] [venv] [app]   (no argument = all three)
# A server is "there" when its port answers; otherwise it is started (and installed first if its
# Debian package is missing). RECON_SETUP_PG_PORT / RECON_SETUP_PG_CLUSTER / RECON_SETUP_AMQP_PORT
# point the checks at another local cluster or node (tests/test_setup_script.py uses them, with
# RabbitMQ's own RABBITMQ_* variables, so that it never stops the shared servers).
set -euo pipefail
cd "$(dirname "$0")/.."

steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(services venv app)
want() { [[ " ${steps[*]} " == *" $1 "* ]]; }
PG_PORT=${RECON_SETUP_PG_PORT:-5432}
PG_CLUSTER=${RECON_SETUP_PG_CLUSTER:-main}
AMQP_PORT=${RECON_SETUP_AMQP_PORT:-5672}
say() { printf 'setup: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, what, seconds
    for _ in $(seq 1 "$3"); do port_open "$1" && return 0; sleep 1; done
    say "$2 did not come up on 127.0.0.1:$1"; exit 1
}

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
        say "installing PostgreSQL (Debian package postgresql)"
        apt_install postgresql
        fresh_pg=1
    fi
    if ! port_open "$PG_PORT"; then
        say "starting PostgreSQL"
        as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" "$PG_CLUSTER" start
        wait_port "$PG_PORT" PostgreSQL 30
    fi
    if [ -n "${fresh_pg:-}" ]; then
        # A fresh Debian cluster asks for a password on TCP; the contract's default URL uses
        # trust for local development, as on the CI machines.
        hba=$(as_root su postgres -c "psql -tAc 'show hba_file'")
        as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
        as_root su postgres -c "psql -qc 'select pg_reload_conf()'" >/dev/null
    fi
}

ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        say "installing RabbitMQ (Debian package rabbitmq-server)"
        apt_install rabbitmq-server
    fi
    if ! port_open "$AMQP_PORT"; then
        say "starting RabbitMQ"
        as_root rabbitmq-server -detached
        wait_port "$AMQP_PORT" RabbitMQ 60
        as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    fi
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv"
        python3 -m venv .venv
    fi
    if [ ! -f .venv/.installed ] || [ requirements-dev.txt -nt .venv/.installed ] \
        || [ pyproject.toml -nt .venv/.installed ]; then
        # The lock, not pyproject.toml's ranges: every machine gets the same versions, each file
        # checked against its hash. Then the project itself, editable, adding nothing unlocked
        # (no dependencies, and built with the locked setuptools rather than a fresh download).
        say "installing the locked dependencies (requirements-dev.txt) and stripe-recon into .venv"
        .venv/bin/pip install -q --require-hashes -r requirements-dev.txt
        .venv/bin/pip install -q --no-deps --no-build-isolation -e .
        touch .venv/.installed
    fi
}

# The console's browser tests (tests/test_console_browser.py) drive Debian's chromium through
# Playwright: the browser comes from Debian's packages, never from a download of Playwright's own.
ensure_chromium() {
    if [ ! -x /usr/bin/chromium ]; then
        say "installing chromium (Debian package) for the console's browser tests"
        apt_install chromium
    fi
}

ensure_app() {
    if [ -z "${STRIPE_WEBHOOK_SECRETS:-}" ] && ! grep -qs '^STRIPE_WEBHOOK_SECRETS=.' .env; then
        secret="whsec_$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')"
        printf 'STRIPE_WEBHOOK_SECRETS=%s\n' "$secret" >> .env
        say "wrote a development webhook secret to .env: $secret"
        say "(use it with: stripe listen --forward-to localhost:8080/webhooks/stripe, or recon demo)"
    fi
    .venv/bin/recon migrate --create-db
}

if want services; then ensure_postgres; ensure_rabbitmq; fi
if want venv; then ensure_venv; ensure_chromium; fi
if want app; then ensure_app; fi
