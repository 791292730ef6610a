"""Server process lifecycle on the embedded PostgreSQL and on an external one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import asyncpg
import pytest

from helpers import ROOT, ServerProcess, http, login, postgres_pids, wait_until

pytestmark = pytest.mark.integration


def test_embedded_start_restart_stop(tmp_path) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(data).start()
    try:
        assert srv.admin_password, "\n".join(srv.output)
        h = http("GET", f"{srv.url}/healthz").json()
        assert h["status"] == "ok" and h["database"] == "ok" and h["database_kind"] == "embedded"
        token = login(srv.url, "admin", srv.admin_password)["access_token"]
        assert http("POST", f"{srv.url}/api/v1/productions", {"name": "Persisted"}, token=token).status == 201
        assert postgres_pids(data), "embedded postgres should be running"
    finally:
        code = srv.stop()
    assert code == 0
    wait_until(lambda: not postgres_pids(data), timeout=10)

    # Restart: same data, no new admin, data kept.
    srv2 = ServerProcess(data).start()
    try:
        assert srv2.admin_password is None
        token = login(srv2.url, "admin", srv.admin_password)["access_token"]
        names = [p["name"] for p in http("GET", f"{srv2.url}/api/v1/productions", token=token).json()["productions"]]
        assert names == ["Persisted"]
    finally:
        assert srv2.stop() == 0
    wait_until(lambda: not postgres_pids(data), timeout=10)


def test_crash_then_restart_adopts_orphaned_database(tmp_path) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(data, env={"RETURNFEED_ADMIN_PASSWORD": "crash-test-pw"}).start()
    pg_before = postgres_pids(data)
    os.kill(srv.proc.pid, signal.SIGKILL)  # the server only, not its process group
    srv.proc.wait(10)
    assert postgres_pids(data) == pg_before, "postgres outlives a crashed server"
    srv2 = ServerProcess(data).start()
    try:
        assert http("GET", f"{srv2.url}/healthz").json()["database"] == "ok"
        login(srv2.url, "admin", "crash-test-pw")
    finally:
        assert srv2.stop() == 0
    wait_until(lambda: not postgres_pids(data), timeout=10)


def test_stale_pid_file_after_postgres_killed(tmp_path) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(data).start()
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    for pid in postgres_pids(data):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not postgres_pids(data), timeout=10)
    assert (data / "pg" / "postmaster.pid").exists()  # stale
    srv2 = ServerProcess(data).start()
    try:
        assert http("GET", f"{srv2.url}/healthz").json()["database"] == "ok"
    finally:
        srv2.stop()
    wait_until(lambda: not postgres_pids(data), timeout=10)


def test_two_servers_migrate_one_database_at_once(db_url, tmp_path) -> None:
    servers = [ServerProcess(tmp_path / f"s{i}", env={"DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "pw-12345678"})
               for i in range(2)]
    errors: list[BaseException] = []

    def start(s: ServerProcess) -> None:
        try:
            s.start()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        for s in servers:
            assert http("GET", f"{s.url}/healthz").json()["database"] == "ok"

        async def check() -> tuple[int, int]:
            conn = await asyncpg.connect(db_url)
            try:
                return (await conn.fetchval("SELECT count(*) FROM schema_migrations"),
                        await conn.fetchval("SELECT count(*) FROM users"))
            finally:
                await conn.close()

        from server.db import load_migrations

        migrations, users = asyncio.run(check())
        assert migrations == len(load_migrations())
        assert users == 1  # exactly one first admin
    finally:
        for s in servers:
            s.stop()


def _cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=e, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_invalid_config_exits_2(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[http]\nport = 99999\n")
    r = _cli("serve", "--config", str(cfg), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "http.port" in r.stderr
    r = _cli("serve", "--data-dir", str(tmp_path), env={"RETURNFEED_SRT__LATENCY_MS": "soon"})
    assert r.returncode == 2 and "srt.latency_ms" in r.stderr
    r = _cli("serve", "--http-port", "notaport")
    assert r.returncode == 2


def test_cli_user_add_token_and_migrate(db_url, tmp_path) -> None:
    env = {"DATABASE_URL": db_url}
    r = _cli("migrate", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("user", "add", "opdirector", "--role", "director", "--password-stdin", env=env,
             stdin="director-password\n")
    assert r.returncode == 0, r.stderr
    r = _cli("user", "add", "opdirector", "--role", "director", env=env, stdin="director-password\n")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = _cli("user", "add", "weak", "--role", "viewer", env=env, stdin="short\n")
    assert r.returncode == 2
    r = _cli("user", "list", env=env)
    assert "opdirector" in r.stdout

    srv = ServerProcess(tmp_path / "srv", env=env).start()
    try:
        tok = login(srv.url, "opdirector", "director-password")["access_token"]
        assert http("POST", f"{srv.url}/api/v1/productions", {"name": "CLI show"}, token=tok).status == 201
        assert http("POST", f"{srv.url}/api/v1/streams", {"name": "camcli", "production": "CLI show"},
                    token=tok).status == 201
        r = _cli("token", "link", "camcli", "--action", "read", "--ttl", "120", "--json", env=env)
        assert r.returncode == 0, r.stderr
        import json

        link = json.loads(r.stdout)
        assert http("GET", f"{srv.url}/api/v1/streams/camcli", token=link["token"]).status == 200
        r = _cli("token", "link", "nostream", "--action", "read", env=env)
        assert r.returncode == 1 and "no stream" in r.stderr
        r = _cli("token", "user", "opdirector", env=env)
        assert r.returncode == 0
        assert http("GET", f"{srv.url}/api/v1/auth/me", token=r.stdout.strip()).json()["username"] == "opdirector"
    finally:
        srv.stop()
