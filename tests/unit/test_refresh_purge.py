"""Issue 9 item 12: dead refresh tokens are deleted, the ones that still
guard a live login against replay are kept."""

from __future__ import annotations

import uuid
from pathlib import Path

from server.api.auth import purge_refresh_tokens
from server.db import Database

DAY = 86400.0


async def test_purge_deletes_dead_refresh_tokens_and_keeps_replay_guards(db_url: str, tmp_path: Path) -> None:
    db = Database(db_url, tmp_path, supervise=False)
    await db.start()
    try:
        async with db.direct() as conn:
            uid = await conn.fetchval(
                "INSERT INTO users (username, password_hash, role) VALUES ('u1', 'x', 'viewer') RETURNING id")
            live, done, recent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            rows = {
                # label: (family, expires in s, revoked s ago or None)
                "live_current": (live, 10 * DAY, None),
                "live_rotated_old": (live, 10 * DAY, 2 * DAY),  # a replay of it must still be caught
                "ended_login": (done, 10 * DAY, 2 * DAY),
                "ended_login_2": (done, 10 * DAY, 3 * DAY),
                "logged_out_recently": (recent, 10 * DAY, 3600.0),
                "expired_long_ago": (uuid.uuid4(), -2 * DAY, None),
                "expired_recently": (uuid.uuid4(), -3600.0, None),
            }
            for label, (family, expires_in, revoked_ago) in rows.items():
                await conn.execute(
                    """INSERT INTO refresh_tokens (user_id, token_hash, family, expires_at, revoked_at, user_agent)
                       VALUES ($1, $2, $3, now() + make_interval(secs => $4),
                               CASE WHEN $5::float8 IS NULL THEN NULL ELSE now() - make_interval(secs => $5) END,
                               $6)""",
                    uid, uuid.uuid4().bytes, family, expires_in, revoked_ago, label)
        assert await purge_refresh_tokens(db, DAY) == 3
        async with db.direct() as conn:
            left = {r["user_agent"] for r in await conn.fetch("SELECT user_agent FROM refresh_tokens")}
        assert left == {"live_current", "live_rotated_old", "logged_out_recently", "expired_recently"}
        assert await purge_refresh_tokens(db, DAY) == 0
    finally:
        await db.close()
