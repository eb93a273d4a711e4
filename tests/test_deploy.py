"""deploy/ stays true to the code: broker definitions, Compose, systemd, Kubernetes and the image.

No container engine is needed: files are parsed and checked against what the application
declares, reads and serves. The one test that touches a server imports the generated RabbitMQ
definitions into a throwaway vhost of the shared broker and lets the app declare its topology on
top, which is exactly where argument drift would fail in production (PRECONDITION_FAILED).
"""

from __future__ import annotations

import configparser
import contextlib
import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import pytest
import yaml

from worker.amqp import topology
from worker.amqp.connection import connect, declare_topology, open_confirm_channel
from worker.amqp.publisher import Publisher, event_message
from worker.cli import build_parser
from worker.serve import build_app
from worker.settings import Settings
from worker.shutdown import BUDGET_S, STOP_GRACE_S

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gen_rabbitmq_definitions", REPO / "scripts" / "gen_rabbitmq_definitions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


class _RecordingEnv(dict[str, str]):
    """An environment that remembers every name Settings.from_env asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)


def settings_names() -> set[str]:
    """Every environment variable Settings knows, learnt by watching it read an environment."""
    env = _RecordingEnv()
    Settings.from_env(env)
    return env.asked


def _interpolate(value: str) -> str:
    """Compose interpolation as with an empty deploy/.env: ${VAR:-default} gives the default,
    a required ${VAR:?...} a URL-safe stand-in (a whsec_ one for the webhook secrets)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(2) == "-":
            return match.group(3)
        return "whsec_standin" if match.group(1) == "STRIPE_WEBHOOK_SECRETS" else "standin"

    return INTERPOLATION.sub(substitute, value)


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def k8s_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def app_routes(mode: str) -> set[tuple[str, str]]:
    app, _port = build_app(mode, Settings(webhook_secrets=("whsec_routes",)))
    return {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource}


# --- RabbitMQ definitions ------------------------------------------------------------------------


def test_definitions_file_is_what_the_topology_module_generates() -> None:
    """deploy/rabbitmq/definitions.json equals worker.topology.definitions() for the default settings:
    a changed queue argument, retry delay or binding in the code fails here until the file is
    regenerated with scripts/gen_rabbitmq_definitions.py."""
    on_disk = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    generated = topology.definitions(Settings().max_attempts, Settings().retry_delays_s)
    for section in ("exchanges", "queues", "bindings"):
        assert on_disk[section] == generated[section], f"{section} drifted: regenerate the definitions file"
    assert on_disk == gen.render()
    assert on_disk["vhosts"] == [{"name": "/"}]
    assert "users" not in on_disk and "permissions" not in on_disk, "no credential belongs in git"


def test_generator_check_mode_passes_on_the_committed_file() -> None:
    """`scripts/gen_rabbitmq_definitions.py --check` (the CI guard) exits 0 on the committed file."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_rabbitmq_definitions.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_added_user_gets_a_salted_hash_and_only_the_apps_resources() -> None:
    """--add-user stores a rabbit_password_hashing_sha256 hash (never the password) and a permission
    regex that covers the app's exchanges and queues but nothing else on the vhost."""
    document = gen.add_user(gen.render(), "recon", "correct horse", ["management"])
    text = json.dumps(document)
    assert "correct horse" not in text
    [user] = document["users"]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    [permission] = document["permissions"]
    allowed = re.compile(permission["configure"])
    names = (
        [e["name"] for e in document["exchanges"]] + [q["name"] for q in document["queues"]] + ["amq.default"]
    )
    assert all(allowed.fullmatch(n) for n in names)
    assert not any(allowed.fullmatch(n) for n in ("other.queue", "amq.topic", "recon"))


RABBITMQCTL_TIMEOUT_S = 60


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rabbitmqctl(*args: str, stdin: str | None = None, check: bool = False, timeout_s: float = 60) -> None:
    """Run rabbitmqctl; on a timeout kill it and everything it started. rabbitmqctl runs `su`, which
    starts a new session for a shell and an Erlang VM: killing only the script would leave them
    holding one of the few distribution ports every other rabbitmqctl call on this machine needs."""
    process = subprocess.Popen(
        ["rabbitmqctl", "-q", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = process.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        process.communicate()
        raise
    if check and process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, process.args, stderr=err)


def _skip_unless_ci(reason: str) -> NoReturn:
    """Skip on a developer's busy machine; under CI (CI set) fail instead: there a check that never
    ran must not pass as green."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (under CI this fails instead of skipping)")
    pytest.skip(reason)


@pytest.fixture
def imported_vhost() -> Iterator[tuple[str, str]]:
    """The committed definitions plus a user, imported into a vhost of their own; removed after."""
    if shutil.which("rabbitmqctl") is None:
        _skip_unless_ci("rabbitmqctl not installed")
    name = f"recon-deploy-test-{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    text = (
        (DEPLOY / "rabbitmq" / "definitions.json").read_text().replace('"vhost": "/"', f'"vhost": "{name}"')
    )
    document = json.loads(text)
    document["vhosts"] = [{"name": name}]
    document = gen.add_user(document, name, password, ["management"])
    try:
        try:
            # Without a file argument rabbitmqctl reads stdin (the broker cannot read our temp files).
            _rabbitmqctl(
                "import_definitions", stdin=json.dumps(document), check=True, timeout_s=RABBITMQCTL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            # Every rabbitmqctl call boots an Erlang VM; under the whole suite's load on two cores
            # the CLI can be this slow. That says nothing about the definitions.
            _skip_unless_ci(f"rabbitmqctl did not answer within {RABBITMQCTL_TIMEOUT_S} s (machine busy)")
        except subprocess.CalledProcessError as exc:
            if "Distribution failed" in (exc.stderr or ""):
                # The CLI could not even reach the node (all its distribution ports are taken by
                # other rabbitmqctl calls): the machine's trouble, not the definitions'.
                _skip_unless_ci("rabbitmqctl could not connect to the node (distribution failed)")
            raise AssertionError(f"RabbitMQ refused the definitions: {exc.stderr}") from exc
        yield name, password
    finally:
        for command in (("delete_vhost", name), ("delete_user", name)):
            with contextlib.suppress(subprocess.TimeoutExpired):
                _rabbitmqctl(*command, timeout_s=30)


async def test_app_declares_and_publishes_on_the_imported_definitions(
    imported_vhost: tuple[str, str],
) -> None:
    """On a broker that imported the definitions, the app's own declaration succeeds (no argument
    drift), and the added user can log in and publish with confirms into the work queue."""
    vhost, password = imported_vhost
    settings = Settings.from_env(
        {"AMQP_URL": f"amqp://{vhost}:{password}@127.0.0.1:5672/{quote(vhost, safe='')}"}
    )
    connection = await connect(settings.amqp_url)
    try:
        await declare_topology(connection, settings)
        channel = await open_confirm_channel(connection)
        publisher = Publisher(channel)
        await publisher.publish_event(event_message(b"{}", "evt_deploy", "charge.refunded", 1))
        queue = await channel.get_queue(topology.WORK_QUEUE, ensure=False)
        delivered = await queue.get(timeout=5)
        assert delivered.message_id == "evt_deploy"
        await delivered.ack()
    finally:
        await connection.close()


# --- Compose -------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    """deploy/compose.yaml passes check-jsonschema's vendored compose-spec schema (works offline)."""
    result = subprocess.run(
        [
            str(VENV_BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_migrations_before_the_app_and_two_workers() -> None:
    """migrate is a one-shot the receiver and the workers wait for; workers run two replicas; the
    receiver publishes 8080 and is healthy only when /readyz is."""
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "migrate", "receiver", "worker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.")
    assert services["migrate"]["command"] == ["migrate", "--create-db"]
    for name in ("receiver", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["receiver"]["command"] == ["receiver"]
    assert services["worker"]["command"] == ["worker"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "8080:8080" in services["receiver"]["ports"]
    assert "http://127.0.0.1:8080/readyz" in " ".join(services["receiver"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8081/readyz" in " ".join(services["worker"]["healthcheck"]["test"])
    for name in ("receiver", "worker"):
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace >= STOP_GRACE_S > BUDGET_S


def _published(entry: Any) -> tuple[str, int]:
    """(host address, container port) of a Compose ports entry, short or long syntax; a port
    published without an address listens on every interface."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "0.0.0.0")), int(entry["target"])
    parts = str(entry).split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else "0.0.0.0"), int(parts[-1])


def test_compose_publishes_only_the_webhook_port_beyond_this_machine() -> None:
    """Only the receiver's webhook port is published on every interface (it serves
    POST /webhooks/stripe); every other published port — the workers' health and metrics, the
    databases' and the broker's, the back-office API's — is bound to 127.0.0.1."""
    services = compose()["services"]
    public = set()
    for name, service in services.items():
        for entry in service.get("ports", []):
            host_ip, target = _published(entry)
            if host_ip != "127.0.0.1":
                public.add((name, target))
    assert public == {("receiver", Settings().http_port)}
    assert ("POST", "/webhooks/stripe") in app_routes("receiver")
    worker = services["worker"]
    assert [_published(p) for p in worker["ports"]] == [("127.0.0.1", Settings().worker_http_port)]
    assert "127.0.0.1::" in worker["ports"][0], "no fixed host port: two replicas cannot share one"


def test_compose_rabbitmq_loads_the_generated_definitions() -> None:
    """RabbitMQ reads rabbitmq.conf, whose load_definitions names the file the one-shot writes from
    deploy/rabbitmq/definitions.json; RabbitMQ starts only after that one-shot succeeded."""
    services = compose()["services"]
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    [load] = re.findall(r"^load_definitions\s*=\s*(\S+)$", conf, re.M)
    writer = services["rabbitmq-definitions"]
    assert "./rabbitmq/definitions.json:/opt/stripe-recon/definitions.json:ro" in writer["volumes"]
    output = writer["command"][writer["command"].index("--output") + 1]
    rabbit = services["rabbitmq"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbit["volumes"]}
    defs_volume = next(
        v.split(":")[0] for v in writer["volumes"] if v.split(":")[1] == str(Path(output).parent)
    )
    assert mounts[str(Path(load).parent)] == defs_volume
    assert any(
        target.startswith("/etc/rabbitmq/conf.d/") and src == "./rabbitmq/rabbitmq.conf"
        for target, src in mounts.items()
    )
    assert rabbit["depends_on"]["rabbitmq-definitions"]["condition"] == "service_completed_successfully"


def test_compose_env_names_are_settings_and_parse() -> None:
    """Every variable the app containers get is one Settings reads (no typo silently ignored), and
    with stand-ins for the interpolated secrets they parse without a SettingsError."""
    known = settings_names()
    services = compose()["services"]
    for name in ("migrate", "receiver", "worker"):
        environment: Mapping[str, Any] = services[name]["environment"]
        assert set(environment) <= known, f"{name}: unknown {set(environment) - known}"
        parsed = Settings.from_env({k: _interpolate(str(v)) for k, v in environment.items()})
        if name == "receiver":
            parsed.require_webhook_secrets()
            assert parsed.http_port == 8080
        if name == "worker":
            assert parsed.worker_http_port == 8081
        if name != "migrate":
            assert parsed.http_host == "0.0.0.0"


def test_compose_holds_no_literal_secret() -> None:
    """Secrets reach the containers only by ${VAR} interpolation from the git-ignored deploy/.env:
    no whsec_/sk_ value and no password written into a URL."""
    text = (DEPLOY / "compose.yaml").read_text()
    assert not re.search(r"whsec_[A-Za-z0-9]|sk_(live|test)_[A-Za-z0-9]", text)
    services = compose()["services"]
    for name in ("migrate", "receiver", "worker"):
        for key, value in services[name]["environment"].items():
            if key in ("DATABASE_URL", "AMQP_URL"):
                password = re.match(r"\w+://[^:]+:([^@]*)@", str(value))
                assert password and INTERPOLATION.fullmatch(password.group(1)), f"{name}.{key}"
            if key in ("STRIPE_WEBHOOK_SECRETS", "STRIPE_API_KEY"):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}.{key}"
    assert "POSTGRES_PASSWORD" in services["postgres"]["environment"]
    assert INTERPOLATION.fullmatch(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    example = (DEPLOY / "env.example").read_text()
    assert not re.search(
        r"^(POSTGRES_PASSWORD|RABBITMQ_PASSWORD|STRIPE_WEBHOOK_SECRETS|STRIPE_API_KEY)=.", example, re.M
    )


# --- systemd -------------------------------------------------------------------------------------


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value.strip())
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.mark.parametrize("name", ["recon-receiver.service", "recon-worker@.service", "recon-migrate.service"])
def test_systemd_unit_has_the_required_settings(name: str) -> None:
    """Each unit reads /etc/stripe-recon/env, restarts on failure, runs unprivileged and sandboxed,
    and runs a `recon` command the CLI accepts; long-running ones stop with SIGTERM and wait longer
    than the 30 s drain."""
    unit = _unit(SYSTEMD / name)
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/stripe-recon/env"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    argv = service["ExecStart"].split()
    recon_at = next(i for i, arg in enumerate(argv) if arg.endswith("/bin/recon"))
    build_parser().parse_args(argv[recon_at + 1 :])  # exits 2 on a command recon does not have
    if service.get("Type") == "oneshot":
        assert argv[recon_at + 1 :] == ["migrate", "--create-db"]
    else:
        assert service["KillSignal"] == "SIGTERM"
        assert _seconds(service["TimeoutStopSec"]) >= STOP_GRACE_S > BUDGET_S
    assert unit["Install"]["WantedBy"] == "recon.target"


def test_worker_instances_listen_on_their_own_port() -> None:
    """The worker template sets RECON_WORKER_HTTP_PORT from the instance name after the environment
    file, so recon-worker@8081 and recon-worker@8082 never share a health port; it requires the
    migrations."""
    service = _unit(SYSTEMD / "recon-worker@.service")
    assert "RECON_WORKER_HTTP_PORT=%i" in service["Service"]["ExecStart"]
    assert "recon-migrate.service" in service["Unit"]["Requires"]
    assert "recon-migrate.service" in service["Unit"]["After"]


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing for the units (any warning fails). The install path
    /opt/stripe-recon/bin/recon is swapped for this venv's recon so the ExecStart check can pass."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip(
            "systemd-analyze not available; test_systemd_unit_has_the_required_settings covers the keys"
        )
    for unit in SYSTEMD.iterdir():
        text = unit.read_text().replace("/opt/stripe-recon/bin/recon", str(VENV_BIN / "recon"))
        (tmp_path / unit.name).write_text(text)
    (tmp_path / "recon-worker@8081.service").write_text((tmp_path / "recon-worker@.service").read_text())
    targets = ["recon-migrate.service", "recon-receiver.service", "recon-worker@8081.service", "recon.target"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / t) for t in targets)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr


# --- Kubernetes ----------------------------------------------------------------------------------


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _probe_port(container: dict[str, Any], probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    [numbered] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(numbered)


def test_k8s_manifests_parse_and_are_listed_in_the_kustomization() -> None:
    """Every manifest is valid YAML with apiVersion/kind/name, and kustomization.yaml lists them all."""
    documents = k8s_documents()
    assert all({"apiVersion", "kind"} <= set(d) for d in documents)
    kustomization = next(d for d in documents if d["kind"] == "Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert all(d["metadata"]["name"] for d in documents if d["kind"] != "Kustomization")


@pytest.mark.parametrize(
    ("deployment", "mode", "default_port"),
    [
        ("recon-receiver", "receiver", Settings().http_port),
        ("recon-worker", "worker", Settings().worker_http_port),
    ],
)
def test_k8s_probes_match_the_apps_routes_and_ports(deployment: str, mode: str, default_port: int) -> None:
    """Liveness probes /healthz and readiness /readyz, on the port that mode listens on (the
    settings default, and the ConfigMap's value), and the app really serves both paths."""
    container = _container(k8s_object("Deployment", deployment))
    assert container["args"] == [mode]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _probe_port(container, "livenessProbe") == _probe_port(container, "readinessProbe") == default_port
    config = k8s_object("ConfigMap", "stripe-recon")["data"]
    configured = Settings.from_env(config)
    assert (configured.http_port if mode == "receiver" else configured.worker_http_port) == default_port
    assert configured.http_host == "0.0.0.0"
    routes = app_routes(mode)
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")} <= routes
    if mode == "receiver":
        assert ("POST", "/webhooks/stripe") in routes


def test_k8s_service_and_pdb_target_the_receiver() -> None:
    """The Service and the PodDisruptionBudget select the receiver pods; the Service forwards to
    the container port the receiver listens on."""
    pods = k8s_object("Deployment", "recon-receiver")["spec"]["template"]["metadata"]["labels"]
    service = k8s_object("Service", "recon-receiver")["spec"]
    assert service["selector"].items() <= pods.items()
    assert service["ports"][0]["targetPort"] in ("http", Settings().http_port)
    pdb = k8s_object("PodDisruptionBudget", "recon-receiver")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pods.items()


def test_k8s_ingress_routes_only_post_webhooks_stripe_to_the_receiver() -> None:
    """The one way in from outside is an Ingress with a single rule: exactly /webhooks/stripe
    (pathType Exact, no default backend) to the receiver Service's port, which the receiver serves
    with POST. /healthz, /readyz and /metrics stay in the cluster: no Service is a LoadBalancer or
    NodePort, and no pod takes a host port or the host's network."""
    documents = k8s_documents()
    routes = [d for d in documents if d["kind"] in ("Ingress", "HTTPRoute", "Gateway")]
    assert [(d["kind"], d["metadata"]["name"]) for d in routes] == [("Ingress", "recon-receiver")]
    spec = routes[0]["spec"]
    assert "defaultBackend" not in spec
    [(host, path)] = [(rule.get("host"), p) for rule in spec["rules"] for p in rule["http"]["paths"]]
    assert (path["path"], path["pathType"]) == ("/webhooks/stripe", "Exact")
    assert host in {h for tls in spec["tls"] for h in tls["hosts"]}, "the webhook host needs TLS"
    backend = path["backend"]["service"]
    assert backend["name"] == "recon-receiver"
    service = k8s_object("Service", "recon-receiver")["spec"]
    [port] = [p for p in service["ports"] if p["name"] == backend["port"]["name"]]
    assert port["targetPort"] in ("http", Settings().http_port)
    assert ("POST", path["path"]) in app_routes("receiver")
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")} <= app_routes("receiver")
    for document in documents:
        if document["kind"] == "Service":
            assert document["spec"].get("type", "ClusterIP") == "ClusterIP", document["metadata"]["name"]
        if document["kind"] in ("Deployment", "Job"):
            pod = document["spec"]["template"]["spec"]
            assert not pod.get("hostNetwork"), document["metadata"]["name"]
            for container in pod["containers"]:
                assert all("hostPort" not in p for p in container.get("ports", [])), container["name"]


def test_k8s_env_and_secrets_are_references_to_known_settings() -> None:
    """No Secret object (or literal secret) is in the manifests; containers take individual keys of
    the Secret "stripe-recon" by reference, and every variable they set is one Settings reads."""
    known = settings_names()
    documents = k8s_documents()
    assert not [d for d in documents if d["kind"] == "Secret"]
    assert set(k8s_object("ConfigMap", "stripe-recon")["data"]) <= known
    for kind, name in (
        ("Deployment", "recon-receiver"),
        ("Deployment", "recon-worker"),
        ("Job", "recon-migrate"),
    ):
        container = _container(k8s_object(kind, name))
        for variable in container.get("env", []):
            assert variable["name"] in known
            assert "value" not in variable, f"{name}: {variable['name']} must come from the Secret"
            assert variable["valueFrom"]["secretKeyRef"]["name"] == "stripe-recon"
            assert variable["valueFrom"]["secretKeyRef"]["key"] == variable["name"]
    assert not re.search(
        r"whsec_[A-Za-z0-9]|sk_(live|test)_[A-Za-z0-9]", "".join(p.read_text() for p in K8S.glob("*.yaml"))
    )


def test_k8s_worker_scaling_shutdown_and_migrate_job() -> None:
    """KEDA scales the workers on the depth of the work queue the topology module names, reading the
    broker URL from the Secret; pods get longer than the 30 s drain to stop; the Job migrates."""
    scaled = k8s_object("ScaledObject", "recon-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "recon-worker"
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == topology.WORK_QUEUE
    auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
    assert auth["secretTargetRef"] == [{"parameter": "host", "name": "stripe-recon", "key": "AMQP_URL"}]
    for name in ("recon-receiver", "recon-worker"):
        pod = k8s_object("Deployment", name)["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= STOP_GRACE_S > BUDGET_S
        assert pod["securityContext"]["runAsNonRoot"] is True
    job = k8s_object("Job", "recon-migrate")
    assert _container(job)["args"] == ["migrate", "--create-db"]
    build_parser().parse_args(_container(job)["args"])


# --- Image ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def test_dockerfile_is_multi_stage_non_root_and_secret_free() -> None:
    """Two stages from python:3.11-slim, the runtime runs as a numeric non-root user with
    ENTRYPOINT recon, copies every package pyproject.toml ships, and sets no secret."""
    instructions = dockerfile_instructions()
    assert len([a for k, a in instructions if k == "FROM"]) == 2
    assert any(k == "ARG" and a == "PYTHON_IMAGE=python:3.11-slim" for k, a in instructions)
    assert [a for k, a in instructions if k == "USER"] == ["10001:10001"]
    assert ("ENTRYPOINT", '["recon"]') in instructions
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {name.split(".")[0] for name in found["include"]}  # the top-level folders it ships
    copied = {a.split()[0] for k, a in instructions if k == "COPY" and not a.startswith("--")}
    assert set(packages) <= copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{p}/" in ignore for p in packages)
    settings_and_secrets = settings_names() | {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD"}
    for keyword, arguments in instructions:
        if keyword in ("ENV", "ARG"):
            names = set(re.findall(r"(\w+)=", arguments))
            assert names <= {
                "RECON_HTTP_HOST",
                "PATH",
                "PYTHONDONTWRITEBYTECODE",
                "PYTHONUNBUFFERED",
                "PIP_NO_CACHE_DIR",
                "PIP_DISABLE_PIP_VERSION_CHECK",
                "PYTHON_IMAGE",
            }
            assert not names & (settings_and_secrets - {"RECON_HTTP_HOST"})


def _healthcheck_script() -> str:
    [arguments] = [a for k, a in dockerfile_instructions() if k == "HEALTHCHECK"]
    command = json.loads(arguments.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    return str(command[2])


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def test_image_healthcheck_finds_healthz_on_either_port() -> None:
    """The image's HEALTHCHECK passes when /healthz answers on the receiver or the worker port and
    fails when neither answers, so one image serves every mode."""
    script = _healthcheck_script()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        closed = "1"  # nothing listens on port 1
        for env, expected in (
            ({"RECON_HTTP_PORT": port, "RECON_WORKER_HTTP_PORT": closed}, 0),
            ({"RECON_HTTP_PORT": closed, "RECON_WORKER_HTTP_PORT": port}, 0),
            ({"RECON_HTTP_PORT": closed, "RECON_WORKER_HTTP_PORT": closed}, 1),
        ):
            result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=30)
            assert result.returncode == expected, (env, result.stderr)
    finally:
        server.shutdown()
        server.server_close()
