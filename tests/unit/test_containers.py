"""The container files: Dockerfile, docker-compose.yml and config/k8s/.

No image is built here (that needs a Docker daemon and the registries);
what can be checked without one is: the files parse and match the Compose
Specification and the Kubernetes API schemas, the published ports are
exactly the server's defaults (HTTP(S), SRT, ICE UDP and TCP), the user is
not root, and the health checks really run — the Dockerfile's HEALTHCHECK
and the Deployment's liveness command are executed against live HTTP and
HTTPS servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from aiohttp import web

from server.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = Settings()
PUBLISHED = {(DEFAULTS.http.port, "tcp"), (DEFAULTS.srt.port, "udp"),
             (DEFAULTS.webrtc.ice_udp_port, "udp"), (DEFAULTS.webrtc.ice_tcp_port, "tcp")}


# -- Dockerfile --------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            if word.upper() == "FROM":
                out = []  # keep only the last stage
            out.append((word.upper(), rest.strip()))
    return out


def _instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def test_dockerfile_runtime_stage() -> None:
    (base,) = _instruction("FROM")
    assert re.fullmatch(r"debian:(bookworm|trixie)-slim", base)
    installs = " ".join(_instruction("RUN"))
    for package in ("python3", "ffmpeg", "libsrt1.5-gnutls"):
        assert re.search(rf"\b{re.escape(package)}\b", installs), package
    (user,) = _instruction("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes' runAsNonRoot can check it
    exposed = {(int(p.split("/")[0]), p.split("/")[1]) for args in _instruction("EXPOSE") for p in args.split()}
    assert exposed == PUBLISHED
    assert any('"/data"' in v or v == "/data" for v in _instruction("VOLUME"))
    env = " ".join(_instruction("ENV"))
    assert "RETURNFEED_DATA_DIR=/data" in env and f"RETURNFEED_HTTP__PORT={DEFAULTS.http.port}" in env


def healthcheck_command() -> list[str]:
    (args,) = _instruction("HEALTHCHECK")
    cmd = args[args.index("CMD") + 3:].strip()
    return json.loads(cmd)


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "tests", "data"} <= ignored
    # What the Dockerfile copies must not be ignored.
    for path in ("server", "media", "tally", "live_qc", "web", "config", "pyproject.toml", "setup.py"):
        assert path not in ignored


# -- docker-compose.yml ---------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _port(spec: str) -> tuple[int, int, str]:
    mapping, _, proto = spec.partition("/")
    host, _, container = mapping.rpartition(":")
    return int(host), int(container), proto or "tcp"


def test_compose_publishes_exactly_the_client_ports() -> None:
    services = compose()["services"]
    app = services["returnfeed"]
    ports = [_port(p) for p in app["ports"]]
    assert {(c, proto) for _, c, proto in ports} == PUBLISHED
    assert all(h == c for h, c, _ in ports)  # same numbers outside: URLs and ICE candidates stay right
    assert "ports" not in services["postgres"]  # the database is not published
    assert services["postgres"]["image"].split(":")[0] == "postgres"  # the official image
    assert app["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in app["environment"]["DATABASE_URL"]
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "coturn" not in services  # shipped commented out
    assert "# coturn:" in (ROOT / "docker-compose.yml").read_text()


def test_compose_environment_is_a_valid_config() -> None:
    """The service's environment, with the compose defaults filled in, as
    the server reads it: ICE-TCP on (its port is published), no announced
    address unless the operator gives one."""
    env = {}
    for key, value in compose()["services"]["returnfeed"]["environment"].items():
        # ${VAR:-default} → default; ${VAR:?message} → a placeholder
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        env[key] = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "secret", value)
    settings = load_settings(environ=env)
    assert settings.webrtc.ice_mux and settings.webrtc.ice_tcp
    assert settings.webrtc.ice_announce == []
    announced = load_settings(environ={**env, "RETURNFEED_WEBRTC__ICE_ANNOUNCE": '["192.0.2.20"]'})
    assert announced.webrtc.ice_announce == ["192.0.2.20"]


def test_compose_matches_the_compose_specification() -> None:
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


# -- Kubernetes -----------------------------------------------------------------------

def k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "config" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_k8s_manifests_match_the_api_schemas() -> None:
    import kubernetes_validate

    for doc in k8s():
        if doc["kind"] == "Kustomization":
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises on any error


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = _one("Kustomization")
    files = {p.name for p in (ROOT / "config" / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_deployment() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert {(p["containerPort"], p["protocol"].lower()) for p in container["ports"]} == PUBLISHED
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/healthz" and named[ready["port"]] == DEFAULTS.http.port
    assert "/healthz" in " ".join(container["livenessProbe"]["exec"]["command"])
    # The database DSN comes from the Secret, the config file from the ConfigMap.
    (dsn,) = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
    secret = _one("Secret")
    assert dsn["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "DATABASE_URL"}
    assert "DATABASE_URL" in secret["stringData"]
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    assert container["args"][container["args"].index("--config") + 1].startswith(mount["mountPath"] + "/")


def test_k8s_configmap_is_a_valid_config(tmp_path: Path) -> None:
    (text,) = _one("ConfigMap")["data"].values()
    path = tmp_path / "returnfeed.toml"
    path.write_text(text)
    settings = load_settings(path, environ={})
    assert settings.http.port == DEFAULTS.http.port and settings.srt.port == DEFAULTS.srt.port
    assert str(settings.data_dir) == "/data"
    assert tomllib.loads(text)["http"]["trusted_proxies"]
    # The media Service publishes the ICE ports the server listens on.
    assert settings.webrtc.ice_mux and settings.webrtc.ice_tcp
    assert (settings.webrtc.ice_udp_port, settings.webrtc.ice_tcp_port) == (
        DEFAULTS.webrtc.ice_udp_port, DEFAULTS.webrtc.ice_tcp_port)


def test_k8s_services_carry_the_media_ports() -> None:
    services = [d for d in k8s() if d["kind"] == "Service"]
    ports = {(p["port"], p["protocol"].lower()) for s in services for p in s["spec"]["ports"]}
    assert ports == PUBLISHED
    udp = [s for s in services if any(p["protocol"] == "UDP" for p in s["spec"]["ports"])]
    assert udp and all(s["spec"]["type"] in ("LoadBalancer", "NodePort") for s in udp)


# -- the health checks, run for real ------------------------------------------------------

class HealthServer:
    """/healthz answering ``status``, over TLS or not, in a thread."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.status = 200
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"}, status=self.status)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.tls)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> "HealthServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ssl.SSLContext]:
    from server.certs import make_local_certificates
    from server.tls import TlsCertificate, TlsFiles

    made = make_local_certificates(tmp_path_factory.mktemp("hc"), ["localhost"], include_host=False)
    yield TlsCertificate(TlsFiles(made.server_cert, made.server_key, "data_dir")).context


def _run(cmd: list[str], port: int) -> int:
    # The image's python3 is a plain Python: run the command with this one.
    argv = [sys.executable if cmd[0] == "python3" else cmd[0], *cmd[1:]]
    env = {**os.environ, "RETURNFEED_HTTP__PORT": str(port)}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("over_tls", [True, False])
def test_docker_healthcheck_runs(server_tls: ssl.SSLContext, over_tls: bool) -> None:
    cmd = healthcheck_command()
    with HealthServer(server_tls if over_tls else None) as srv:
        assert _run(cmd, srv.port) == 0
        srv.status = 503  # degraded: unhealthy
        assert _run(cmd, srv.port) != 0
    assert _run(cmd, srv.port) != 0  # nothing listening


def test_k8s_liveness_tolerates_a_database_outage() -> None:
    container = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    cmd = container["livenessProbe"]["exec"]["command"]
    script = cmd[-1].replace(f":{DEFAULTS.http.port}/", ":{port}/")
    assert "{port}" in script, shlex.join(cmd)
    with HealthServer(None) as srv:
        live = [*cmd[:-1], script.replace("{port}", str(srv.port))]
        assert _run(live, srv.port) == 0
        srv.status = 503  # database away: still alive, not restarted
        assert _run(live, srv.port) == 0
        srv.status = 500
        assert _run(live, srv.port) != 0
    assert _run(live, srv.port) != 0
