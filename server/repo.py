"""SQL for users, productions, members, streams, tokens, tally and audit.

Every function takes a connection or pool (anything with ``fetch``/
``fetchrow``/``execute``) so callers choose the transaction. Values are always
bound parameters: names with quotes or SQL fragments are stored literally.
``jsonb`` columns and parameters are Python objects: the codec is set once
per connection (:func:`server.db.set_codecs`).
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from .auth import generate_passphrase
from .redact import redact_secrets, redact_text

Conn = Any  # asyncpg.Connection | asyncpg.Pool


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- secrets -------------------------------------------------------------

async def get_or_create_secret(conn: Conn, name: str) -> str:
    value = secrets.token_urlsafe(48)
    await conn.execute(
        "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING", name, value
    )
    return await conn.fetchval("SELECT value FROM server_secrets WHERE name = $1", name)


# -- users ---------------------------------------------------------------

USER_COLS = "id, username, role, disabled, created_at"


async def count_users(conn: Conn) -> int:
    return await conn.fetchval("SELECT count(*) FROM users")


async def create_user(conn: Conn, username: str, password_hash: str, role: str) -> asyncpg.Record:
    return await conn.fetchrow(
        f"INSERT INTO users (username, password_hash, role) VALUES ($1, $2, $3) RETURNING {USER_COLS}",
        username, password_hash, role,
    )


async def user_by_name(conn: Conn, username: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {USER_COLS}, password_hash FROM users WHERE lower(username) = lower($1)", username
    )


async def user_by_id(conn: Conn, user_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {USER_COLS} FROM users WHERE id = $1", user_id)


async def list_users(conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT {USER_COLS} FROM users ORDER BY id")


async def set_password(conn: Conn, user_id: int, password_hash: str) -> None:
    await conn.execute("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
                       user_id, password_hash)


def user_json(r: asyncpg.Record) -> dict[str, Any]:
    return {"id": r["id"], "username": r["username"], "role": r["role"], "disabled": r["disabled"],
            "created_at": r["created_at"].isoformat()}


# -- refresh tokens --------------------------------------------------------

async def store_refresh(conn: Conn, user_id: int, token_hash: bytes, ttl_s: int, family: uuid.UUID | None,
                        user_agent: str | None, ip: str | None) -> int:
    return await conn.fetchval(
        """INSERT INTO refresh_tokens (user_id, token_hash, family, expires_at, user_agent, ip)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        user_id, token_hash, family or uuid.uuid4(), _now() + timedelta(seconds=ttl_s),
        (user_agent or "")[:256], ip,
    )


async def refresh_by_hash(conn: Conn, token_hash: bytes) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT t.id, t.user_id, t.family, t.expires_at, t.revoked_at, t.replaced_by,
                  u.username, u.role, u.disabled
           FROM refresh_tokens t JOIN users u ON u.id = t.user_id
           WHERE t.token_hash = $1 FOR UPDATE OF t""",
        token_hash,
    )


async def revoke_refresh(conn: Conn, token_id: int, replaced_by: int | None = None) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = coalesce(revoked_at, now()), replaced_by = $2 WHERE id = $1",
        token_id, replaced_by,
    )


async def revoke_family(conn: Conn, family: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family = $1 AND revoked_at IS NULL", family
    )


async def purge_refresh_tokens(conn: Conn, keep_revoked_s: float, batch: int = 1000,
                               timeout: float | None = None) -> int:
    """Delete refresh tokens nobody can use any more; returns how many.

    Expired rows go once they are ``keep_revoked_s`` past expiry. A revoked
    row is kept while its login (family) still has a live token: a rotated
    token that comes back is how theft is detected (RFC 6819 §5.2.2.3). Once
    the whole login is over, its rows go ``keep_revoked_s`` after revocation.
    Deleted in batches, so that each statement stays short.
    """
    total = 0
    while True:
        n = await conn.fetchval(
            """WITH gone AS (
                   DELETE FROM refresh_tokens WHERE id IN (
                       SELECT t.id FROM refresh_tokens t
                       WHERE t.expires_at < now() - make_interval(secs => $1)
                          OR (t.revoked_at < now() - make_interval(secs => $1)
                              AND NOT EXISTS (SELECT 1 FROM refresh_tokens l
                                              WHERE l.family = t.family AND l.revoked_at IS NULL
                                                AND l.expires_at > now()))
                       LIMIT $2)
                   RETURNING 1)
               SELECT count(*) FROM gone""",
            float(keep_revoked_s), batch, timeout=timeout,
        )
        total += n
        if n < batch:
            return total


async def link_revoked(conn: Conn, jti: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM revoked_links WHERE jti = $1", jti))


async def revoke_link(conn: Conn, jti: str, expires_at: datetime, by: int | None) -> None:
    await conn.execute(
        "INSERT INTO revoked_links (jti, expires_at, revoked_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        jti, expires_at, by,
    )


# -- productions -----------------------------------------------------------

PROD_COLS = "p.id, p.name, p.description, p.settings, p.created_at, p.updated_at"


def production_settings_json(settings: Any, my_role: str | None) -> dict[str, Any]:
    """A production's settings as ``my_role`` may see them (issue 9 item 1):
    secrets are write-only for everyone; switcher adapter configurations are
    for directors (and admins) only."""
    out = redact_secrets(settings or {})
    if my_role not in ("director", "admin") and isinstance(out.get("tally"), dict):
        out["tally"] = {k: v for k, v in out["tally"].items() if k != "adapters"}
    return out


def production_json(r: asyncpg.Record, my_role: str | None = None) -> dict[str, Any]:
    out = {"id": r["id"], "name": r["name"], "description": r["description"],
           "settings": production_settings_json(r["settings"], my_role or "director"),
           "created_at": r["created_at"].isoformat(), "updated_at": r["updated_at"].isoformat()}
    if my_role is not None:
        out["my_role"] = my_role
    return out


async def create_production(conn: Conn, name: str, description: str, created_by: int | None) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO productions AS p (name, description, created_by) VALUES ($1, $2, $3)
            RETURNING {PROD_COLS}""",
        name, description, created_by,
    )


async def find_production(conn: Conn, ref: str | int) -> asyncpg.Record | None:
    """By id (int or all-digit string) or by exact name."""
    if isinstance(ref, int) and not 0 < ref < 2**63:
        return None  # no bigint id is out there; asyncpg would refuse to send it
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and len(ref) < 19):
        row = await conn.fetchrow(f"SELECT {PROD_COLS} FROM productions p WHERE p.id = $1", int(ref))
        if row is not None or isinstance(ref, int):
            return row
    return await conn.fetchrow(f"SELECT {PROD_COLS} FROM productions p WHERE p.name = $1", str(ref))


async def list_productions(conn: Conn, user_id: int | None) -> list[asyncpg.Record]:
    """All productions (``user_id`` None: admin) or those the user belongs to."""
    if user_id is None:
        return await conn.fetch(f"SELECT {PROD_COLS}, NULL::text AS my_role FROM productions p ORDER BY p.id")
    return await conn.fetch(
        f"""SELECT {PROD_COLS}, m.role AS my_role FROM productions p
            JOIN production_members m ON m.production_id = p.id AND m.user_id = $1 ORDER BY p.id""",
        user_id,
    )


async def update_production(conn: Conn, pid: int, name: str | None, description: str | None) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""UPDATE productions p SET name = coalesce($2, name), description = coalesce($3, description),
                   updated_at = now() WHERE p.id = $1 RETURNING {PROD_COLS}""",
        pid, name, description,
    )


async def delete_production(conn: Conn, pid: int) -> bool:
    return await conn.execute("DELETE FROM productions WHERE id = $1", pid) == "DELETE 1"


async def member_role(conn: Conn, production_id: int, user_id: int) -> str | None:
    return await conn.fetchval(
        "SELECT role FROM production_members WHERE production_id = $1 AND user_id = $2", production_id, user_id
    )


async def set_member(conn: Conn, production_id: int, user_id: int, role: str,
                     camera_stream: str | None) -> asyncpg.Record:
    return await conn.fetchrow(
        """INSERT INTO production_members (production_id, user_id, role, camera_stream)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (production_id, user_id) DO UPDATE SET role = $3, camera_stream = $4
           RETURNING production_id, user_id, role, camera_stream""",
        production_id, user_id, role, camera_stream,
    )


async def remove_member(conn: Conn, production_id: int, user_id: int) -> bool:
    res = await conn.execute("DELETE FROM production_members WHERE production_id = $1 AND user_id = $2",
                             production_id, user_id)
    return res == "DELETE 1"


async def list_members(conn: Conn, production_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT m.user_id, u.username, m.role, m.camera_stream FROM production_members m
           JOIN users u ON u.id = m.user_id WHERE m.production_id = $1 ORDER BY u.username""",
        production_id,
    )


# -- streams ---------------------------------------------------------------

STREAM_COLS = ("s.id, s.name, s.production_id, p.name AS production_name, s.passphrase, s.pbkeylen, "
               "s.latency_ms, s.label, s.settings, s.created_at, s.updated_at")


async def create_stream(conn: Conn, name: str, production_id: int, pbkeylen: int, label: str,
                        settings: dict[str, Any], latency_ms: int | None = None) -> asyncpg.Record:
    sid = await conn.fetchval(
        """INSERT INTO streams (name, production_id, passphrase, pbkeylen, label, settings, latency_ms)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) RETURNING id""",
        name, production_id, generate_passphrase(), pbkeylen, label, settings, latency_ms,
    )
    return await stream_by_id(conn, sid)


async def stream_by_id(conn: Conn, sid: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {STREAM_COLS} FROM streams s JOIN productions p ON p.id = s.production_id WHERE s.id = $1", sid
    )


async def stream_by_name(conn: Conn, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {STREAM_COLS} FROM streams s JOIN productions p ON p.id = s.production_id WHERE s.name = $1",
        name,
    )


async def list_streams(conn: Conn, production_ids: list[int] | None) -> list[asyncpg.Record]:
    if production_ids is None:
        return await conn.fetch(
            f"SELECT {STREAM_COLS} FROM streams s JOIN productions p ON p.id = s.production_id ORDER BY s.id"
        )
    return await conn.fetch(
        f"""SELECT {STREAM_COLS} FROM streams s JOIN productions p ON p.id = s.production_id
            WHERE s.production_id = ANY($1::bigint[]) ORDER BY s.id""",
        production_ids,
    )


async def rotate_passphrase(conn: Conn, sid: int) -> None:
    await conn.execute("UPDATE streams SET passphrase = $2, updated_at = now() WHERE id = $1",
                       sid, generate_passphrase())


async def update_stream(conn: Conn, sid: int, label: str | None, settings: dict[str, Any] | None) -> None:
    await conn.execute(
        """UPDATE streams SET label = coalesce($2, label),
                  settings = coalesce($3::jsonb, settings), updated_at = now() WHERE id = $1""",
        sid, label, settings,
    )


async def stream_settings_for_update(conn: Conn, sid: int) -> dict[str, Any] | None:
    """The stream's settings, row locked until the transaction ends: two
    directors patching at once apply one after the other, neither lost."""
    row = await conn.fetchrow("SELECT settings FROM streams WHERE id = $1 FOR UPDATE", sid)
    return None if row is None else (row["settings"] or {})


async def set_stream_sections(conn: Conn, sid: int, sections: dict[str, Any]) -> dict[str, Any]:
    """Replace the QC/captions sections of a stream's settings (the other
    keys stay); the streams trigger's NOTIFY tells every node."""
    return await conn.fetchval(
        """UPDATE streams SET settings = (settings - 'qc' - 'captions') || $2::jsonb, updated_at = now()
           WHERE id = $1 RETURNING settings""", sid, sections)


async def set_stream_latency(conn: Conn, sid: int, latency_ms: int | None) -> None:
    """None: back to the server's default."""
    await conn.execute("UPDATE streams SET latency_ms = $2, updated_at = now() WHERE id = $1", sid, latency_ms)


async def delete_stream(conn: Conn, sid: int) -> bool:
    return await conn.execute("DELETE FROM streams WHERE id = $1", sid) == "DELETE 1"


async def user_production_roles(conn: Conn, user_id: int) -> dict[int, str]:
    rows = await conn.fetch("SELECT production_id, role FROM production_members WHERE user_id = $1", user_id)
    return {r["production_id"]: r["role"] for r in rows}


# -- audit -----------------------------------------------------------------

async def audit(conn: Conn, action: str, *, actor_user_id: int | None = None, actor: str = "",
                target: str = "", detail: dict[str, Any] | None = None, ip: str | None = None) -> None:
    await conn.execute(
        # $5 is text cast to jsonb: the redaction works on the serialised
        # text, so it is sent as text rather than through the jsonb codec.
        "INSERT INTO audit_log (actor_user_id, actor, action, target, detail, ip) "
        "VALUES ($1,$2,$3,$4,$5::text::jsonb,$6)",
        # Issue 9 item 4: audit rows never keep a token or passphrase.
        actor_user_id, actor, action, redact_text(target),
        redact_text(json.dumps(redact_secrets(detail or {}), default=str)), ip,
    )


# -- tally -----------------------------------------------------------------

async def production_name_settings(conn: Conn, production_id: int) -> asyncpg.Record | None:
    """``name`` and ``settings`` of a production (None: no such production)."""
    return await conn.fetchrow("SELECT name, settings FROM productions WHERE id = $1", production_id)


async def production_settings(conn: Conn, production_id: int) -> dict[str, Any]:
    """A production's settings object ({} for no such production)."""
    return await conn.fetchval("SELECT settings FROM productions WHERE id = $1", production_id) or {}


async def production_tally_config(conn: Conn, production_id: int) -> dict[str, Any] | None:
    """The stored tally configuration (``settings.tally``), None when unset."""
    return await conn.fetchval("SELECT settings -> 'tally' FROM productions WHERE id = $1", production_id)


async def set_production_tally_config(conn: Conn, production_id: int, cfg: dict[str, Any]) -> None:
    await conn.execute(
        """UPDATE productions SET settings = jsonb_set(settings, '{tally}', $2::jsonb), updated_at = now()
           WHERE id = $1""", production_id, cfg)


async def stream_labels(conn: Conn, production_id: int) -> list[asyncpg.Record]:
    """``name`` and ``label`` of a production's streams, oldest first (its tally sources)."""
    return await conn.fetch("SELECT name, label FROM streams WHERE production_id = $1 ORDER BY id", production_id)


async def stream_names_by_production(conn: Conn) -> dict[int, list[str]]:
    """Every production's stream names, oldest first."""
    rows = await conn.fetch("SELECT production_id, array_agg(name ORDER BY id) AS names "
                            "FROM streams GROUP BY production_id")
    return {r["production_id"]: list(r["names"]) for r in rows}


async def tally_state(conn: Conn, production_id: int) -> asyncpg.Record | None:
    """The stored ``seq`` and ``state`` of a production's tally."""
    return await conn.fetchrow("SELECT seq, state FROM tally_state WHERE production_id = $1", production_id)


async def append_tally_events(conn: Conn, production_id: int,
                              events: list[tuple[int, dict[str, Any], str, str]]) -> None:
    """Audit rows ``(seq, changes, actor, origin)`` of one production."""
    await conn.executemany(
        """INSERT INTO tally_events (production_id, seq, changes, actor, origin)
           VALUES ($1, $2, $3::jsonb, $4, $5)""",
        [(production_id, seq, changes, actor, origin) for seq, changes, actor, origin in events],
    )


async def store_tally_state(conn: Conn, production_id: int, seq: int, state: dict[str, Any]) -> int | None:
    """Upsert the production's state unless the stored one has a ``seq`` at
    least as high; returns ``seq`` when written, None when another writer
    got there first."""
    return await conn.fetchval(
        """INSERT INTO tally_state (production_id, seq, state) VALUES ($1, $2, $3::jsonb)
           ON CONFLICT (production_id) DO UPDATE SET seq = EXCLUDED.seq, state = EXCLUDED.state,
                  updated_at = now()
           WHERE tally_state.seq < EXCLUDED.seq
           RETURNING seq""",
        production_id, seq, state,
    )


async def notify(conn: Conn, channel: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


async def tally_events(conn: Conn, production_id: int, before_seq: int | None, limit: int) -> list[asyncpg.Record]:
    """Newest first: ``seq, changes, actor, origin, at`` below ``before_seq`` (all when None)."""
    return await conn.fetch(
        """SELECT seq, changes, actor, origin, at FROM tally_events
           WHERE production_id = $1 AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC, id DESC LIMIT $3""",
        production_id, before_seq, limit)


# -- QC markers and notes (issue 12) -------------------------------------------

_MARKER_COLS = ("m.id, s.name AS stream, m.type, m.subtype, m.severity, m.confidence, m.media_start, "
                "m.media_end, m.wall_start, m.wall_end, m.metadata, m.false_positive, m.verified_at, "
                "u.username AS verified_by")


async def insert_marker(conn: Conn, stream_id: int, m: dict[str, Any]) -> int:
    """One marker row from the live fields ``m`` (media_*, wall_* as datetimes)."""
    return await conn.fetchval(
        "INSERT INTO markers (stream_id, type, subtype, severity, confidence, media_start, media_end, "
        "wall_start, wall_end, metadata) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) RETURNING id",
        stream_id, m["type"], m["subtype"], m["severity"], m["confidence"], m["media_start"], m["media_end"],
        m["wall_start"], m["wall_end"], m["metadata"])


async def update_marker(conn: Conn, marker_id: int, m: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE markers SET severity = $2, confidence = $3, media_start = $4, media_end = $5, wall_start = $6, "
        "wall_end = $7, metadata = $8 WHERE id = $1",
        marker_id, m["severity"], m["confidence"], m["media_start"], m["media_end"], m["wall_start"],
        m["wall_end"], m["metadata"])


async def marker_by_id(conn: Conn, marker_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_MARKER_COLS}, s.production_id, s.id AS stream_id FROM markers m "
        "JOIN streams s ON s.id = m.stream_id LEFT JOIN users u ON u.id = m.verified_by WHERE m.id = $1",
        marker_id)


async def list_markers(conn: Conn, stream_id: int, *, since: datetime | None, until: datetime | None,
                       types: list[str] | None, include_false_positive: bool, limit: int,
                       before_id: int | None = None) -> list[asyncpg.Record]:
    """Markers overlapping [since, until) on the wall clock, newest first
    (an open marker overlaps everything after its start)."""
    return await conn.fetch(
        f"SELECT {_MARKER_COLS} FROM markers m JOIN streams s ON s.id = m.stream_id "
        "LEFT JOIN users u ON u.id = m.verified_by "
        "WHERE m.stream_id = $1 AND ($2::timestamptz IS NULL OR m.wall_end IS NULL OR m.wall_end >= $2) "
        "AND ($3::timestamptz IS NULL OR m.wall_start < $3) AND ($4::text[] IS NULL OR m.type = ANY($4)) "
        "AND ($5 OR NOT m.false_positive) AND ($6::bigint IS NULL OR m.id < $6) "
        "ORDER BY m.wall_start DESC, m.id DESC LIMIT $7",
        stream_id, since, until, types, include_false_positive, before_id, limit)


async def flag_marker(conn: Conn, marker_id: int, *, false_positive: bool | None, verified: bool | None,
                      user_id: int | None) -> None:
    """``verified``/``false_positive`` set by a director; either one records
    who decided and when (verified_by/at); ``verified: false`` clears them."""
    await conn.execute(
        "UPDATE markers SET false_positive = COALESCE($2, false_positive), "
        "verified_by = CASE WHEN $3::boolean IS FALSE THEN NULL ELSE $4::bigint END, "
        "verified_at = CASE WHEN $3::boolean IS FALSE THEN NULL ELSE now() END WHERE id = $1",
        marker_id, false_positive, verified, user_id)


async def insert_note(conn: Conn, stream_id: int, marker_id: int | None, at: datetime, text: str,
                      author_user_id: int | None, author: str) -> asyncpg.Record:
    return await conn.fetchrow(
        "INSERT INTO notes (stream_id, marker_id, at, text, author_user_id, author) VALUES ($1,$2,$3,$4,$5,$6) "
        "RETURNING id, marker_id, at, text, author, created_at",
        stream_id, marker_id, at, text, author_user_id, author)


async def list_notes(conn: Conn, stream_id: int, *, marker_id: int | None, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, marker_id, at, text, author, created_at FROM notes WHERE stream_id = $1 "
        "AND ($2::bigint IS NULL OR marker_id = $2) ORDER BY at DESC, id DESC LIMIT $3",
        stream_id, marker_id, limit)


# -- captions --------------------------------------------------------------------

_CAPTION_COLS = ("c.id, c.media_start, c.media_end, c.wall_start, c.wall_end, c.text, c.language, c.words, "
                 "c.label, c.translated")


async def insert_captions(conn: Conn, rows: list[tuple]) -> None:
    """Final captions: (stream_id, media_start, media_end, wall_start,
    wall_end, text, language, words, label, translated) each."""
    await conn.executemany(
        "INSERT INTO captions (stream_id, media_start, media_end, wall_start, wall_end, text, language, final, "
        "words, label, translated) VALUES ($1,$2,$3,$4,$5,$6,$7,true,$8,$9,$10)", rows)


async def list_captions(conn: Conn, stream_id: int, *, since: datetime | None, until: datetime | None,
                        limit: int, after_id: int | None = None) -> list[asyncpg.Record]:
    """Final captions overlapping [since, until) on the wall clock, oldest
    first (``after_id``: the page after that row)."""
    return await conn.fetch(
        f"SELECT {_CAPTION_COLS} FROM captions c WHERE c.stream_id = $1 AND c.final "
        "AND ($2::timestamptz IS NULL OR c.wall_end >= $2) AND ($3::timestamptz IS NULL OR c.wall_start < $3) "
        "AND ($4::bigint IS NULL OR (c.wall_start, c.id) > "
        "(SELECT wall_start, id FROM captions WHERE id = $4)) "
        "ORDER BY c.wall_start, c.id LIMIT $5",
        stream_id, since, until, after_id, limit)
