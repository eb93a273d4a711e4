#!/usr/bin/env python3
"""Writes deploy/rabbitmq/definitions.json from worker.topology, and adds a broker user at deploy time.

The broker topology has exactly one source: ``worker.topology``. The receiver and the worker
declare it at start-up; a broker that imported different arguments (another x-delivery-limit,
another retry delay) makes that declaration fail with PRECONDITION_FAILED. So the definitions file
is generated, never edited, and tests/test_deploy.py fails when it drifts.

    scripts/gen_rabbitmq_definitions.py                  # regenerate deploy/rabbitmq/definitions.json
    scripts/gen_rabbitmq_definitions.py --check          # exit 1 if the committed file is stale
    scripts/gen_rabbitmq_definitions.py --max-attempts 10 --retry-delays 5,60,600 -o my-defs.json

The committed file holds no user: RabbitMQ skips creating its default user when it imports
definitions at boot, and a password hash in git would be a credential in git. At deploy time,
``--add-user`` merges a user and its permissions into a copy of the file, reading the password
from an environment variable. That mode uses the standard library only, so deploy/compose.yaml
runs it in a bare python image before RabbitMQ starts:

    RABBITMQ_PASSWORD=… scripts/gen_rabbitmq_definitions.py --add-user recon \\
        --password-env RABBITMQ_PASSWORD --input deploy/rabbitmq/definitions.json -o /defs/definitions.json
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "deploy" / "rabbitmq" / "definitions.json"
VHOST = "/"
# Everything the application declares, binds, publishes to or consumes from: the topic exchange,
# the dead-letter exchange, the default exchange (retries and replays publish straight to a
# queue through it) and the recon.* queues. Nothing else on the vhost is the app's business.
APP_RESOURCES = r"^(amq\.default|stripe\.events|recon\..+)$"


def render(
    max_attempts: int | None = None, retry_delays_s: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """The definitions document: the vhost plus worker.topology.definitions() for these settings."""
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
    from worker.amqp import topology
    from worker.settings import DEFAULT_RETRY_DELAYS_S, Settings

    attempts = Settings().max_attempts if max_attempts is None else max_attempts
    delays = DEFAULT_RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s
    # vhosts first: a blank node importing at boot creates nothing by itself, not even "/".
    return {"vhosts": [{"name": VHOST}], **topology.definitions(attempts, delays)}


def dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt ‖ sha256(salt ‖ password)), 4-byte salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def add_user(document: dict[str, Any], name: str, password: str, tags: list[str]) -> dict[str, Any]:
    """A copy of ``document`` with ``name`` able to run the app (and nothing else) on every vhost in it."""
    merged = dict(document)
    merged["users"] = [
        *(u for u in document.get("users", []) if u.get("name") != name),
        {
            "name": name,
            "password_hash": rabbit_password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": tags,
        },
    ]
    vhosts = [v["name"] for v in document.get("vhosts", [{"name": VHOST}])]
    merged["permissions"] = [
        *(p for p in document.get("permissions", []) if p.get("user") != name),
        *(
            {
                "user": name,
                "vhost": vhost,
                "configure": APP_RESOURCES,
                "write": APP_RESOURCES,
                "read": APP_RESOURCES,
            }
            for vhost in vhosts
        ),
    ]
    return merged


def _delays(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated seconds expected, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="file to write ('-' = stdout)"
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the output file instead of writing it"
    )
    parser.add_argument(
        "--max-attempts", type=int, help="RECON_MAX_ATTEMPTS the broker will run with (default 8)"
    )
    parser.add_argument("--retry-delays", type=_delays, help="RECON_RETRY_DELAYS_S the broker will run with")
    user = parser.add_argument_group("deploy time: add a user to an existing definitions file")
    user.add_argument("--add-user", metavar="NAME", help="user the receiver and workers log in as")
    user.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding that user's password"
    )
    user.add_argument("--tags", default="management", help="comma-separated user tags (default: management)")
    user.add_argument(
        "--input", type=Path, help="definitions file to extend (default: generate from worker.topology)"
    )
    return parser


def _document(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.input is not None:
        document: dict[str, Any] = json.loads(args.input.read_text(encoding="utf-8"))
    else:
        document = render(args.max_attempts, args.retry_delays)
    if args.add_user:
        if not args.password_env:
            parser.error("--add-user needs --password-env VAR")
        password = os.environ.get(args.password_env, "")
        if not password:
            parser.error(f"{args.password_env} is empty or not set")
        tags = [t.strip() for t in args.tags.split(",") if t.strip()]
        document = add_user(document, args.add_user, password, tags)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    text = dump(_document(args, parser))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run scripts/gen_rabbitmq_definitions.py", file=sys.stderr)
            return 1
        return 0
    if str(args.output) == "-":
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
