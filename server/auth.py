"""Authentication: password hashing, tokens, signed stream links, login limits.

Token kinds (all HS256 JWTs signed with one server secret, told apart by
audience so one can never be used as another):

=============  =====================  ==========================================
kind           ``aud``                claims
=============  =====================  ==========================================
access         ``returnfeed:access``  sub (user id), name, role, sid (the login:
                                      its refresh-token family); short-lived
stream link    ``returnfeed:link``    stream, sid (the stream's id — not a
                                      login: link and access tokens never
                                      mix), act (publish|read), prod (id),
                                      role (camera|viewer), jti; scoped to one
                                      stream and one action
=============  =====================  ==========================================

Refresh tokens are opaque random strings, stored only as SHA-256 hashes,
rotated on every use. Reusing a rotated refresh token revokes its whole
family (that login), the standard response to a stolen token (RFC 6819
§5.2.2.3). Logging out (or that theft response) also puts the login's
``sid`` on a denylist every node checks on auth (``Directory``), so its
access tokens stop working before they expire.

Passwords are hashed with Argon2id (memory-hard; RFC 9106), off the event
loop because a hash takes tens of milliseconds by design.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ISSUER = "returnfeed"
AUD_ACCESS = "returnfeed:access"
AUD_LINK = "returnfeed:link"
ROLES = ("admin", "director", "camera", "viewer")
MEMBER_ROLES = ("director", "camera", "viewer")
LinkAction = Literal["publish", "read"]
#: Clock skew tolerated between nodes (seconds).
LEEWAY_S = 5

# RFC 9106 §4 second recommended option (64 MiB, t=3, p=4) is the library
# default; keep it.
_hasher = PasswordHasher()
# A real hash of a random password: verifying against it when the user does
# not exist costs the same time as a real check, so timing tells nothing.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class TokenError(Exception):
    """A token is missing, malformed, forged, expired or of the wrong kind."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant-work check; ``None`` hash (unknown user) always fails."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


def validate_password_strength(password: str) -> str | None:
    """Return a reason the password is unacceptable, or ``None``."""
    if len(password) < 8:
        return "password must be at least 8 characters"
    if len(password) > 1024:
        return "password must be at most 1024 characters"
    return None


def new_refresh_token() -> tuple[str, bytes]:
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def generate_passphrase() -> str:
    """A 32-character SRT passphrase (libsrt accepts 10–79)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: int
    username: str
    role: str
    expires_at: int
    #: The login (refresh-token family) this token belongs to; None for
    #: tokens issued outside a login (``returnfeed issue-token``).
    session: str | None = None


@dataclass(frozen=True, slots=True)
class LinkClaims:
    stream: str
    action: LinkAction
    production_id: int
    role: str
    jti: str
    expires_at: int
    #: The stream's id (issue 9 item 2): a link names a stream *and* is bound
    #: to that one row, so a new stream that reuses a deleted stream's name
    #: is not opened by the old stream's links. None: a token minted before
    #: the binding, which the server refuses.
    stream_id: int | None = None


class TokenService:
    def __init__(self, secret: str, *, access_ttl_s: int = 900, clock: Any = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("token secret must be at least 32 characters")
        self._key = secret
        self.access_ttl_s = access_ttl_s
        self._clock = clock

    def _encode(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self._key, algorithm="HS256")

    def _decode(self, token: str, audience: str) -> dict[str, Any]:
        if not token or len(token) > 4096:
            raise TokenError("token missing or too long")
        try:
            claims = jwt.decode(
                token, self._key, algorithms=["HS256"], audience=audience, issuer=ISSUER,
                # Time is checked below against the injectable clock.
                options={"require": ["exp", "iat", "aud", "iss"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise TokenError("token not valid for this use") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        now = self._clock()
        try:
            exp, iat = float(claims["exp"]), float(claims["iat"])
        except (TypeError, ValueError):
            raise TokenError("invalid token: bad time claims") from None
        if exp + LEEWAY_S <= now:
            raise TokenError("token expired")
        if iat - LEEWAY_S > now:
            raise TokenError("invalid token: issued in the future")
        return claims

    def issue_access(self, user_id: int, username: str, role: str,
                     session: str | None = None) -> tuple[str, int]:
        now = int(self._clock())
        exp = now + self.access_ttl_s
        payload: dict[str, Any] = {
            "iss": ISSUER, "aud": AUD_ACCESS, "sub": str(user_id), "name": username,
            "role": role, "iat": now, "exp": exp, "jti": uuid.uuid4().hex,
        }
        if session is not None:
            payload["sid"] = session
        return self._encode(payload), exp

    def verify_access(self, token: str) -> AccessClaims:
        c = self._decode(token, AUD_ACCESS)
        try:
            sid = c.get("sid")
            return AccessClaims(int(c["sub"]), str(c["name"]), str(c["role"]), int(c["exp"]),
                                None if sid is None else str(sid))
        except (KeyError, ValueError, TypeError):
            raise TokenError("invalid token: missing claims") from None

    def issue_link(self, stream: str, action: LinkAction, production_id: int, ttl_s: int,
                   role: str | None = None, *, stream_id: int | None = None) -> tuple[str, LinkClaims]:
        if action not in ("publish", "read"):
            raise ValueError("action must be publish or read")
        now = int(self._clock())
        role = role or ("camera" if action == "publish" else "viewer")
        claims = LinkClaims(stream, action, production_id, role, uuid.uuid4().hex[:16], now + ttl_s, stream_id)
        payload: dict[str, Any] = {
            "iss": ISSUER, "aud": AUD_LINK, "stream": stream, "act": action,
            "prod": production_id, "role": role, "jti": claims.jti, "iat": now, "exp": claims.expires_at,
        }
        if stream_id is not None:
            payload["sid"] = stream_id
        return self._encode(payload), claims

    def link_passphrase(self, jti: str, stream_passphrase: str) -> str:
        """The SRT passphrase of one publish link (issue 9 item 5).

        The listen callback sets the passphrase per connection, so a caller
        with ``s=<link>`` is keyed with a passphrase derived from that link
        (and from the stream's own, so rotating it changes every link's):
        the link's ``srt_url`` never carries a credential that outlives the
        link. 32 characters of base64url (libsrt accepts 10–79)."""
        mac = hmac.new(self._key.encode(), f"srt-link\0{jti}\0{stream_passphrase}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode()[:32]

    def verify_link(self, token: str) -> LinkClaims:
        c = self._decode(token, AUD_LINK)
        try:
            act = c["act"]
            if act not in ("publish", "read"):
                raise TokenError("invalid token: bad action")
            sid = c.get("sid")
            return LinkClaims(str(c["stream"]), act, int(c["prod"]), str(c.get("role", "viewer")),
                              str(c["jti"]), int(c["exp"]), None if sid is None else int(sid))
        except (KeyError, ValueError, TypeError):
            raise TokenError("invalid token: missing claims") from None


class LoginLimiter:
    """Sliding-window counts of failed logins, kept three ways.

    * Per (user name, client IP): after ``per_user_ip`` failures every further
      attempt from that address waits ``backoff_s``, doubled for each further
      failure (at most the window). The guesser slows down; the account's
      owner at another address does not notice.
    * Per user name over all addresses: ``per_user``, a much higher limit that
      bounds distributed guessing. It never applies to an address that logged
      in to the account before, so a stranger's spray of wrong passwords
      cannot lock a director out of a show from their usual place.
    * Per client IP over all user names: ``per_ip`` (password spraying).

    In memory per process: a login spread over several nodes gets at most
    ``nodes ×`` the limits, which still stops online guessing.
    """

    def __init__(self, per_user: int, per_ip: int, window_s: float, clock: Any = time.monotonic,
                 max_keys: int = 100_000, *, per_user_ip: int = 5, backoff_s: float = 1.0) -> None:
        self.per_user = per_user
        self.per_ip = per_ip
        self.per_user_ip = per_user_ip
        self.window_s = window_s
        self.backoff_s = backoff_s
        self._clock = clock
        self._max_keys = max_keys
        self._fails: dict[str, deque[float]] = {}
        #: (user, IP) pairs that logged in successfully, oldest first.
        self._known: dict[str, None] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    @staticmethod
    def _pair(username: str, ip: str) -> str:
        return f"p:{username.lower()}\0{ip}"

    def retry_after(self, username: str, ip: str) -> float:
        """Seconds until another attempt is allowed (0 = allowed now)."""
        now = self._clock()
        wait = 0.0
        limits = [(f"i:{ip}", self.per_ip)]
        if self._pair(username, ip) not in self._known:
            limits.append((f"u:{username.lower()}", self.per_user))
        for key, limit in limits:
            q = self._recent(key, now)
            if len(q) >= limit:
                wait = max(wait, q[len(q) - limit] + self.window_s - now)
        q = self._recent(self._pair(username, ip), now)
        if len(q) >= self.per_user_ip:
            delay = min(self.window_s, self.backoff_s * 2.0 ** (len(q) - self.per_user_ip))
            wait = max(wait, q[-1] + delay - now)
        return max(wait, 0.0)

    def failed(self, username: str, ip: str) -> None:
        now = self._clock()
        if len(self._fails) >= self._max_keys:
            # Bounded memory under a spray of user names: drop expired keys,
            # then the oldest.
            for key in list(self._fails)[: self._max_keys // 10]:
                self._recent(key, now)
                self._fails.pop(key, None)
        for key in (f"u:{username.lower()}", f"i:{ip}", self._pair(username, ip)):
            self._fails.setdefault(key, deque()).append(now)

    def succeeded(self, username: str, ip: str) -> None:
        pair = self._pair(username, ip)
        self._fails.pop(f"u:{username.lower()}", None)
        self._fails.pop(pair, None)
        self._known.pop(pair, None)
        self._known[pair] = None
        while len(self._known) > self._max_keys:
            del self._known[next(iter(self._known))]
