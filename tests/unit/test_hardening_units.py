"""Issue 9: redaction of secrets and tokens, link binding, grant re-checks."""

from __future__ import annotations

from server.auth import TokenService
from server.directory import ProductionEntry, Snapshot, StreamEntry
from server.grants import Grant, Grants, check
from server.redact import keep_secrets, redact_secrets, redact_text

SECRET = "x" * 40


def test_redact_text_masks_tokens_and_passphrases() -> None:
    ts = TokenService(SECRET)
    token, _ = ts.issue_link("cam1", "publish", 1, 60, stream_id=7)
    lines = [
        f"srt.rejected streamid='#!::r=cam1,m=publish,s={token}' code=1401",
        f"streamid=#!::r=cam1,s={token[:30]},m=publish",  # cut short: still a token
        "srt://h:8890?streamid=publish:cam1&passphrase=abcdefghijkl&pbkeylen=16",
        "GET /whep/cam1?token=opaque-value-123",
        '{"type": "obs", "password": "hunter22"}',
        "OBS ws://obsuser:hunter33@10.0.0.6:4455: connection closed",
    ]
    out = [redact_text(line) for line in lines]
    assert not any("eyJ" in o for o in out)
    assert "abcdefghijkl" not in out[2] and "pbkeylen=16" in out[2]
    assert "opaque-value-123" not in out[3] and "hunter22" not in out[4]
    assert "hunter33" not in out[5] and "obsuser:" in out[5] and "@10.0.0.6:4455" in out[5]
    # Not a token: left alone.
    assert redact_text("stream=cam1 status=200 bytes=10") == "stream=cam1 status=200 bytes=10"


def test_secrets_are_write_only_and_survive_a_round_trip() -> None:
    stored = {"adapters": [{"type": "obs", "url": "ws://a:4455", "password": "pw-a"},
                           {"type": "obs", "url": "ws://b:4455", "password": "pw-b"},
                           {"type": "vmix", "host": "v", "port": 8099}]}
    shown = redact_secrets(stored)
    assert shown["adapters"][0] == {"type": "obs", "url": "ws://a:4455", "password_set": True}
    assert "pw-a" not in repr(shown) and "password_set" not in shown["adapters"][2]
    # A mapping under a credential-like name is data, not a secret.
    assert redact_secrets({"sources": {"token": {"label": "T"}}}) == {"sources": {"token": {"label": "T"}}}
    # Sent back reordered: each secret stays with its own server.
    back = {"adapters": [shown["adapters"][1], shown["adapters"][0], shown["adapters"][2]]}
    kept = keep_secrets(back, stored)
    assert kept["adapters"][0] == {"type": "obs", "url": "ws://b:4455", "password": "pw-b"}
    assert kept["adapters"][1]["password"] == "pw-a"
    # Pointed at another server: the secret does not follow.
    moved = keep_secrets({"adapters": [{"type": "obs", "url": "ws://evil:4455", "password_set": True}]}, stored)
    assert moved == {"adapters": [{"type": "obs", "url": "ws://evil:4455"}]}
    # A new password replaces the stored one.
    new = keep_secrets({"adapters": [{"type": "obs", "url": "ws://a:4455", "password": "pw-new",
                                      "password_set": True}]}, stored)
    assert new["adapters"][0]["password"] == "pw-new" and "password_set" not in new["adapters"][0]


def test_link_binding_and_link_passphrase() -> None:
    ts = TokenService(SECRET)
    token, claims = ts.issue_link("cam1", "publish", 3, 60, stream_id=11)
    assert ts.verify_link(token).stream_id == 11 == claims.stream_id
    p1 = ts.link_passphrase(claims.jti, "stream-passphrase-1")
    assert p1 == ts.link_passphrase(claims.jti, "stream-passphrase-1") and len(p1) == 32
    assert p1 != ts.link_passphrase("another-jti", "stream-passphrase-1")
    assert p1 != ts.link_passphrase(claims.jti, "stream-passphrase-2")  # rotating the stream's re-keys links
    assert p1 != TokenService("y" * 40).link_passphrase(claims.jti, "stream-passphrase-1")


def _snap(*, stream_id: int = 11, passphrase: str = "pp-1", revoked: frozenset = frozenset(),
          members: dict | None = None) -> Snapshot:
    e = StreamEntry(stream_id, "cam1", 3, "Show", passphrase, 16, "")
    return Snapshot(streams={"cam1": e}, productions={3: ProductionEntry(3, "Show")}, production_names={"Show": 3},
                    members=members if members is not None else {(3, 5): "director"}, revoked=revoked)


def test_grant_checks() -> None:
    ts = TokenService(SECRET)
    _, link = ts.issue_link("cam1", "read", 3, 60, stream_id=11)
    g = Grant("whep", 3, lambda r: None, lambda: True, stream="cam1", stream_id=11, link=link)
    assert check(g, _snap()) is None
    assert check(g, _snap(revoked=frozenset({link.jti}))) == "link revoked"
    assert check(g, _snap(stream_id=12)) == "the link's stream was deleted"  # same name, new stream
    srt = Grant("srt-publish", 3, lambda r: None, lambda: True, stream="cam1", stream_id=11, passphrase="pp-1")
    assert check(srt, _snap()) is None
    assert check(srt, _snap(passphrase="pp-2")) == "stream passphrase changed"
    tally = Grant("tally", 3, lambda r: None, lambda: True, user_id=5, roles=("director",))
    assert check(tally, _snap()) is None
    assert check(tally, _snap(members={(3, 5): "viewer"})) == "production role changed to viewer"
    assert check(tally, _snap(members={})) == "no longer a member of the production"
    admin = Grant("tally", 3, lambda r: None, lambda: True, user_id=1)
    assert check(admin, _snap(members={})) is None


def test_sweep_closes_once_and_forgets_ended_sessions() -> None:
    ts = TokenService(SECRET)
    _, link = ts.issue_link("cam1", "read", 3, 60, stream_id=11)
    closed: list[str] = []
    grants = Grants()
    grants.add("a", Grant("whep", 3, closed.append, lambda: True, stream="cam1", stream_id=11, link=link))
    grants.add("gone", Grant("whep", 3, closed.append, lambda: False, stream="cam1", stream_id=11, link=link))
    assert grants.sweep(_snap()) == 0 and len(grants) == 1
    assert grants.sweep(_snap(revoked=frozenset({link.jti}))) == 1 and closed == ["link revoked"]
    assert grants.sweep(_snap(revoked=frozenset({link.jti}))) == 0 and len(grants) == 0
