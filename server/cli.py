"""The ``returnfeed`` command.

::

    returnfeed serve   [--config F] [--data-dir D] [--http-port N] [--srt-port N] [--metrics-port N]
    returnfeed migrate [--config F] [--data-dir D]
    returnfeed user add NAME --role admin|director|camera|viewer [--password-stdin]
    returnfeed user list
    returnfeed token link STREAM --action publish|read [--ttl SECONDS] [--base-url URL]
    returnfeed token user NAME [--ttl SECONDS]
    returnfeed qc FILE [--json]
    returnfeed captions FILE [--model NAME|PATH] [--language xx] [--translate] [-o out.vtt|out.srt]
    returnfeed cert [--hosts NAME,IP,...] [--days N] [--new-ca] [--no-host]

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from .config import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (default: config/returnfeed.toml)")
    p.add_argument("--data-dir", type=Path, help="data directory (embedded database lives here)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="returnfeed", description="ReturnFeed live-production media server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    _common(p)
    p.add_argument("--http-port", type=int)
    p.add_argument("--srt-port", type=int)
    p.add_argument("--metrics-port", type=int, help="metrics listener port (0: any free port)")

    p = sub.add_parser("migrate", help="apply database migrations and exit")
    _common(p)

    user = sub.add_parser("user", help="manage users")
    usub = user.add_subparsers(dest="user_command", required=True)
    p = usub.add_parser("add", help="create a user (password prompted, or read from stdin)")
    _common(p)
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["admin", "director", "camera", "viewer"])
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p = usub.add_parser("list", help="list users")
    _common(p)

    token = sub.add_parser("token", help="issue signed tokens")
    tsub = token.add_subparsers(dest="token_command", required=True)
    p = tsub.add_parser("link", help="a signed link for one stream and one action")
    _common(p)
    p.add_argument("stream")
    p.add_argument("--action", required=True, choices=["publish", "read"])
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: auth.link_ttl_s)")
    p.add_argument("--base-url", help="server URL for the printed links (default: from config)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = tsub.add_parser("user", help="an access token for a user (scripts, load tests)")
    _common(p)
    p.add_argument("name")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: auth.access_ttl_s)")

    p = sub.add_parser("qc", help="run the live QC detectors on a recording")
    p.add_argument("file", help="media file (anything FFmpeg reads)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("captions", help="caption a recording (WebVTT or SRT), as the live tap would")
    p.add_argument("file", help="media file (anything FFmpeg reads)")
    p.add_argument("--model", help="tiny.en (default), base, or a CTranslate2 Whisper model directory")
    p.add_argument("--language", help="spoken language code (default: detect; tiny.en is English only)")
    p.add_argument("--translate", action="store_true", help="translate to English")
    p.add_argument("-o", "--output", help="write to this .vtt or .srt file (default: WebVTT on stdout)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="data directory (the base model is joined into it once)")
    p.add_argument("--cpu-threads", type=int, default=2, help="CTranslate2 threads (default 2)")

    p = sub.add_parser("cert", help="make a local CA and an HTTPS certificate for this host (LAN use)")
    _common(p)
    p.add_argument("--hosts", default="", help="extra host names and IP addresses, comma-separated")
    p.add_argument("--days", type=int, default=397, help="server certificate lifetime (at most 825)")
    p.add_argument("--new-ca", action="store_true", help="replace the local CA (phones must install it again)")
    p.add_argument("--no-host", action="store_true",
                   help="certify only --hosts, not this machine's own names and addresses")
    return parser


def _cert(settings: Settings, args: argparse.Namespace) -> int:
    from .certs import CertError, make_local_certificates

    try:
        made = make_local_certificates(settings.data_dir, args.hosts.split(","), days=args.days,
                                       new_ca=args.new_ca, include_host=not args.no_host)
    except CertError as exc:
        print(f"returnfeed cert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ca_state = "created" if made.ca_created else "reused"
    print(f"local CA ({ca_state}):   {made.ca_cert.resolve()}")
    print(f"  SHA-256 fingerprint: {made.ca_fingerprint}")
    print(f"server certificate: {made.server_cert.resolve()}  (valid until {made.not_after:%Y-%m-%d})")
    print(f"  key: {made.server_key.resolve()}")
    print(f"  names:     {', '.join(made.dns_names) or '-'}")
    print(f"  addresses: {', '.join(made.ip_addresses) or '-'}")
    print("With http.tls = \"auto\" (the default) `returnfeed serve` uses these files from the data directory;")
    print("to name them explicitly, put in the config file:")
    print(f"  [http]\n  tls_cert = \"{made.server_cert.resolve()}\"\n  tls_key = \"{made.server_key.resolve()}\"")
    print("A running server picks up the renewed certificate on SIGHUP (kill -HUP <pid>).")
    print("Phones: open /ca.crt on the server (or its redirect port) and install it as a CA; "
          "compare the fingerprint above.")
    return EXIT_OK


def _qc(args: argparse.Namespace) -> int:
    from live_qc.filescan import QcFileError, analyse_file, format_table

    try:
        report = analyse_file(args.file)
    except QcFileError as exc:
        print(f"returnfeed qc: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # noqa: BLE001 - one line for the user, as main() does
        print(f"returnfeed qc: {args.file}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(report.to_json()) if args.json else format_table(report))
    return EXIT_OK


def _captions(args: argparse.Namespace) -> int:
    from live_qc.captions.filecaption import run_cli

    try:
        code, message = run_cli(args.file, model=args.model, language=args.language, translate=args.translate,
                                output=args.output, data_dir=str(args.data_dir), cpu_threads=args.cpu_threads)
    except Exception as exc:  # noqa: BLE001 - one line for the user, as main() does
        code, message = EXIT_FAIL, f"{args.file}: {type(exc).__name__}: {exc}"
    if message:
        print(f"returnfeed captions: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"data_dir": getattr(args, "data_dir", None)}
    if getattr(args, "http_port", None) is not None:
        overrides["http.port"] = args.http_port
    if getattr(args, "srt_port", None) is not None:
        overrides["srt.port"] = args.srt_port
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics.port"] = args.metrics_port
    return load_settings(args.config, overrides)


async def _with_db(settings: Settings, fn: Callable[[Any], Awaitable[int]]) -> int:
    from .main import database_from_settings

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # One-shot commands need no supervisor (no LISTEN, no probing).
    db = database_from_settings(settings, supervise=False, pool_max=2)
    await db.start()
    try:
        return await fn(db)
    finally:
        await db.close()


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise ValueError("passwords do not match")
    return first


async def _user_add(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    from . import repo
    from .auth import hash_password, validate_password_strength

    password = _read_password(args.password_stdin)
    reason = validate_password_strength(password)
    if reason:
        print(f"returnfeed: {reason}", file=sys.stderr)
        return EXIT_USAGE

    async def run(db: Any) -> int:
        try:
            row = await repo.create_user(db.pool, args.name, hash_password(password), args.role)
        except asyncpg.UniqueViolationError:
            print(f"returnfeed: user {args.name!r} already exists", file=sys.stderr)
            return EXIT_FAIL
        await repo.audit(db.pool, "user.create", actor="cli", target=args.name, detail={"role": args.role})
        print(f"created user {row['username']!r} (id {row['id']}, role {row['role']})")
        return EXIT_OK

    return await _with_db(settings, run)


async def _user_list(settings: Settings) -> int:
    from . import repo

    async def run(db: Any) -> int:
        for r in await repo.list_users(db.pool):
            print(f"{r['id']:>5}  {r['role']:<8}  {r['username']}{'  (disabled)' if r['disabled'] else ''}")
        return EXIT_OK

    return await _with_db(settings, run)


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    from urllib.parse import quote, urlencode

    from . import repo
    from .main import token_service

    async def run(db: Any) -> int:
        tokens = await token_service(db, settings)
        if args.token_command == "user":
            user = await repo.user_by_name(db.pool, args.name)
            if user is None:
                print(f"returnfeed: no user {args.name!r}", file=sys.stderr)
                return EXIT_FAIL
            if args.ttl:
                tokens.access_ttl_s = args.ttl
            token, exp = tokens.issue_access(user["id"], user["username"], user["role"])
            print(token)
            return EXIT_OK
        stream = await repo.stream_by_name(db.pool, args.stream)
        if stream is None:
            print(f"returnfeed: no stream {args.stream!r}", file=sys.stderr)
            return EXIT_FAIL
        ttl = args.ttl or settings.auth.link_ttl_s
        if not 10 <= ttl <= settings.auth.max_link_ttl_s:
            print(f"returnfeed: --ttl must be between 10 and {settings.auth.max_link_ttl_s}", file=sys.stderr)
            return EXIT_USAGE
        token, claims = tokens.issue_link(stream["name"], args.action, stream["production_id"], ttl,
                                          stream_id=stream["id"])
        await repo.audit(db.pool, "link.create", actor="cli", target=stream["name"],
                         detail={"action": args.action, "jti": claims.jti, "ttl_s": ttl})
        base = (args.base_url or settings.http.public_url or f"http://localhost:{settings.http.port}").rstrip("/")
        name = quote(stream["name"])
        q = urlencode({"token": token})
        out: dict[str, Any] = {"token": token, "stream": stream["name"], "action": args.action,
                               "expires_at": claims.expires_at}
        if args.action == "publish":
            out["whip_url"] = f"{base}/whip/{name}?{q}"
            out["camera_url"] = f"{base}/camera/{name}?{q}"
        else:
            out["whep_url"] = f"{base}/whep/{name}?{q}"
            out["watch_url"] = f"{base}/watch/{name}?{q}"
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            for k, v in out.items():
                print(f"{k}: {v}")
        return EXIT_OK

    return await _with_db(settings, run)


async def _migrate(settings: Settings) -> int:
    async def run(db: Any) -> int:
        print("database schema is up to date")
        return EXIT_OK

    return await _with_db(settings, run)


def _run(coro: Awaitable[int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency on Linux/macOS
        return asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "qc":  # offline: needs no configuration or database
        return _qc(args)
    if args.command == "captions":  # offline too
        return _captions(args)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"returnfeed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .log import setup_logging

    setup_logging(settings.log.level, settings.log.format)
    try:
        if args.command == "serve":
            from .main import serve

            if settings.webrtc.ice_mux:
                # An announced name that does not resolve is a configuration
                # error (exit 2), before the database is even started.
                from media.webrtc.icemux import resolve_announce

                resolve_announce(settings.webrtc.ice_announce, settings.webrtc.ice_bind_address)
            return _run(serve(settings))
        if args.command == "migrate":
            return _run(_migrate(settings))
        if args.command == "user":
            if args.user_command == "add":
                return _run(_user_add(settings, args))
            return _run(_user_list(settings))
        if args.command == "token":
            return _run(_token(settings, args))
        if args.command == "cert":
            return _cert(settings, args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"returnfeed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a CLI reports, never dumps a traceback on the user
        print(f"returnfeed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
