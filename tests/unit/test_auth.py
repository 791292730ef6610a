import pytest

from server.auth import (
    LoginLimiter, TokenError, TokenService, hash_password, hash_refresh_token, new_refresh_token,
    validate_password_strength, verify_password,
)

SECRET = "s" * 48


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_password_hash_roundtrip_and_memory_hard() -> None:
    h = hash_password("correct horse battery")
    assert h.startswith("$argon2id$") and "m=65536" in h
    assert verify_password(h, "correct horse battery")
    assert not verify_password(h, "correct horse batterx")
    assert not verify_password(None, "anything")
    assert not verify_password("not-a-hash", "x")


def test_password_strength() -> None:
    assert validate_password_strength("short")
    assert validate_password_strength("long enough") is None


def test_access_token_roundtrip_and_expiry() -> None:
    clock = Clock()
    ts = TokenService(SECRET, access_ttl_s=60, clock=clock)
    token, exp = ts.issue_access(7, "alice", "director")
    c = ts.verify_access(token)
    assert (c.user_id, c.username, c.role, c.expires_at) == (7, "alice", "director", exp)
    clock.t += 120
    with pytest.raises(TokenError, match="expired"):
        ts.verify_access(token)


def test_forged_and_wrong_audience_tokens_rejected() -> None:
    ts = TokenService(SECRET)
    other = TokenService("x" * 48)
    forged, _ = other.issue_access(1, "admin", "admin")
    with pytest.raises(TokenError):
        ts.verify_access(forged)
    link, _ = ts.issue_link("cam1", "read", 3, 60)
    with pytest.raises(TokenError, match="not valid for this use"):
        ts.verify_access(link)
    access, _ = ts.issue_access(1, "a", "admin")
    with pytest.raises(TokenError):
        ts.verify_link(access)
    for junk in ("", "abc", "a.b.c", "x" * 5000):
        with pytest.raises(TokenError):
            ts.verify_access(junk)


def test_none_algorithm_token_rejected() -> None:
    import jwt

    ts = TokenService(SECRET)
    unsigned = jwt.encode({"iss": "returnfeed", "aud": "returnfeed:access", "sub": "1", "name": "a",
                           "role": "admin", "iat": 1, "exp": 9_999_999_999}, key=None, algorithm="none")
    with pytest.raises(TokenError):
        ts.verify_access(unsigned)


def test_link_scoped_to_stream_and_action() -> None:
    clock = Clock()
    ts = TokenService(SECRET, clock=clock)
    token, claims = ts.issue_link("cam1", "publish", 42, 30)
    c = ts.verify_link(token)
    assert (c.stream, c.action, c.production_id, c.role) == ("cam1", "publish", 42, "camera")
    assert c.jti == claims.jti
    clock.t += 100
    with pytest.raises(TokenError, match="expired"):
        ts.verify_link(token)
    with pytest.raises(ValueError):
        ts.issue_link("cam1", "delete", 1, 30)  # type: ignore[arg-type]


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError):
        TokenService("short")


def test_refresh_tokens_random_and_hashed() -> None:
    a, ha = new_refresh_token()
    b, hb = new_refresh_token()
    assert a != b and ha != hb and hash_refresh_token(a) == ha and len(ha) == 32


def test_login_limiter_per_user_and_ip() -> None:
    t = [0.0]
    lim = LoginLimiter(per_user=3, per_ip=5, window_s=60, clock=lambda: t[0], per_user_ip=10)
    for _ in range(3):
        assert lim.retry_after("Bob", "1.2.3.4") == 0
        lim.failed("Bob", "1.2.3.4")
    assert lim.retry_after("bob", "9.9.9.9") > 0  # per user, case-insensitive
    assert lim.retry_after("carol", "1.2.3.4") == 0
    lim.failed("carol", "1.2.3.4")
    lim.failed("dave", "1.2.3.4")
    assert lim.retry_after("erin", "1.2.3.4") > 0  # per IP
    t[0] += 61
    assert lim.retry_after("bob", "1.2.3.4") == 0
    lim.failed("zed", "5.5.5.5")
    lim.succeeded("zed", "5.5.5.5")
    assert lim.retry_after("zed", "6.6.6.6") == 0


def test_login_limiter_stranger_cannot_lock_out_owner() -> None:
    """Issue 9 item 13: failures count per (user, IP) with backoff; the
    per-user limit is slower and spares addresses the user logged in from."""
    t = [0.0]
    lim = LoginLimiter(per_user=50, per_ip=1000, window_s=300, clock=lambda: t[0], per_user_ip=5, backoff_s=1.0)
    lim.succeeded("director", "10.0.0.1")  # the director's usual address
    for _ in range(5):
        assert lim.retry_after("director", "6.6.6.6") == 0
        lim.failed("director", "6.6.6.6")
    assert lim.retry_after("director", "6.6.6.6") == 1.0  # the stranger waits...
    assert lim.retry_after("director", "10.0.0.1") == 0  # ...the owner does not
    assert lim.retry_after("director", "10.0.0.2") == 0  # nor the owner at a new address
    # Backoff doubles per further failure from the same address.
    waits = []
    for _ in range(4):
        t[0] += lim.retry_after("director", "6.6.6.6")
        lim.failed("director", "6.6.6.6")
        waits.append(lim.retry_after("director", "6.6.6.6"))
    assert waits == [2.0, 4.0, 8.0, 16.0]
    # A distributed spray reaches the per-user limit: unknown addresses wait,
    # the address the director logged in from does not.
    for i in range(50):
        lim.failed("director", f"10.9.{i}.1")
    assert lim.retry_after("director", "10.0.0.2") > 0
    assert lim.retry_after("director", "10.0.0.1") == 0
