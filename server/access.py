"""Who is calling and what they may do: the request helpers every route uses.

A leaf below the route modules (it reads state through :mod:`server.keys`
and imports no route module):

* the caller: :class:`Principal`, :func:`bearer_token`, :func:`principal`
  (a user's access token, or a signed stream link, checked against the
  in-memory directory), :func:`user_principal`;
* roles: :func:`require_roles`, :func:`production_role`,
  :func:`require_production_role`, and :func:`stream_entry`, the stream
  from the directory;
* request bodies: :func:`json_body` / :func:`parse_json_object` (strict
  RFC 8259 that PostgreSQL can store); :func:`client_ip`, :func:`base_url`;
* streams and sessions (WHIP and WHEP share them): :func:`authorize_stream`
  (read/publish), :func:`register_grant` (revocation ends the session),
  who owns a session (:func:`owner_key`) and the session URL's capability
  (:func:`session_location`, :func:`session_access`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from aiohttp import web

from . import repo
from .auth import LinkClaims, TokenError
from .directory import StreamEntry
from .errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from .grants import Grant
from .keys import DB, DIRECTORY, SESSION_SECRET, SETTINGS, TOKENS
from .proxy import client_address, request_scheme


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a logged-in user, or the holder of a stream link."""

    kind: str  # "user" | "link"
    role: str  # admin | director | camera | viewer
    user_id: int | None = None
    username: str = ""
    link: LinkClaims | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and self.role == "admin"

    @property
    def label(self) -> str:
        return self.username if self.kind == "user" else f"link:{self.link.jti if self.link else ''}"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        return value.strip()
    return request.query.get("token") or None


async def principal(request: web.Request, *, allow_link: bool = True) -> Principal:
    """Authenticate the request or raise 401."""
    token = bearer_token(request)
    if not token:
        raise Unauthorized()
    tokens = request.app[TOKENS]
    try:
        c = tokens.verify_access(token)
    except TokenError as exc:
        access_error = exc
    else:
        # From memory, shared through NOTIFY: a logout ends its access tokens
        # on every node before they expire (issue 9, item 14).
        if c.session is not None and request.app[DIRECTORY].session_ended(c.session):
            raise Unauthorized("logged out; please log in again")
        return Principal("user", c.role, c.user_id, c.username)
    if allow_link:
        try:
            link = tokens.verify_link(token)
        except TokenError as exc:
            # Report the more specific reason (expired beats wrong audience).
            reason = str(access_error) if "expired" in str(access_error) else str(exc)
            raise Unauthorized(reason) from None
        # From memory (DESIGN.md invariant 1): a WHEP join or tally socket with a signed
        # link must not wait for the database.
        if request.app[DIRECTORY].is_revoked(link.jti):
            raise Unauthorized("link revoked")
        # Bound to its stream's id and production (issue 9 item 2), for every
        # route that takes a link: REST, WHIP, WHEP, /ws/tally.
        problem = request.app[DIRECTORY].link_problem(link, await stream_entry(request, link.stream))
        if problem is not None:
            raise Unauthorized(problem)
        return Principal("link", link.role, link=link)
    raise Unauthorized(str(access_error))


async def user_principal(request: web.Request) -> Principal:
    return await principal(request, allow_link=False)


def require_roles(p: Principal, *roles: str) -> None:
    if p.role not in roles:
        raise Forbidden(f"requires role {' or '.join(roles)}")


async def production_role(request: web.Request, p: Principal, production_id: int) -> str | None:
    """The caller's role in a production: 'admin', a member role, or None."""
    if p.is_admin:
        return "admin"
    if p.kind == "link":
        return p.role if p.link and p.link.production_id == production_id else None
    assert p.user_id is not None
    role = request.app[DIRECTORY].member_role(production_id, p.user_id)
    db = request.app[DB]
    if role is None and db.available:
        # Not in this node's copy: maybe added a moment ago on another node
        # (its NOTIFY still on the way). The database is authoritative when up.
        role = await repo.member_role(db.pool, production_id, p.user_id)
    return role


async def stream_entry(request: web.Request, name: str) -> StreamEntry | None:
    """The stream from the in-memory directory: a WHEP join or WHIP publish
    never waits for the database. Only a name this node has not
    heard of yet is looked up, and only while the database is up."""
    entry = request.app[DIRECTORY].stream(name)
    db = request.app[DB]
    if entry is None and db.available:
        row = await repo.stream_by_name(db.pool, name)
        if row is not None:
            entry = StreamEntry(row["id"], row["name"], row["production_id"], row["production_name"],
                                row["passphrase"], row["pbkeylen"], row["label"] or "", row["latency_ms"])
    return entry


async def stream_records(request: web.Request, *, write: bool = False) -> tuple[StreamEntry, Principal]:
    """The stream named in the path (``{name}``) of a record route (markers,
    notes, captions) and a caller allowed to read its records (a link of that
    stream, its production's directors, admins) or, for ``write``, to act on
    them (directors and admins)."""
    p = await principal(request)
    entry = await stream_entry(request, request.match_info["name"])
    if entry is None:
        raise NotFound("no such stream")
    await check_stream_records(request, p, entry, write=write)
    return entry, p


async def check_stream_records(request: web.Request, p: Principal, entry: StreamEntry, *, write: bool) -> None:
    if p.kind == "link":
        if p.link is None or p.link.stream != entry.name:
            raise Forbidden("this link is for another stream")
        if write:
            raise Forbidden("requires production role director")
        return
    role = await production_role(request, p, entry.production_id)
    if role is None:
        raise Forbidden("not a member of this production")
    if role not in ("admin", "director"):
        raise Forbidden("requires production role director")


async def require_production_role(request: web.Request, p: Principal, production_id: int,
                                  *roles: str) -> str:
    role = await production_role(request, p, production_id)
    if role is None:
        raise Forbidden("not a member of this production")
    if role != "admin" and role not in roles:
        raise Forbidden(f"requires production role {' or '.join(roles)}")
    return role


async def json_body(request: web.Request, max_bytes: int | None = None) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    limit = max_bytes or request.app[SETTINGS].http.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body larger than {limit} bytes")
    raw = await request.read()
    data = parse_json_object(raw)
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object")
    return data


#: Deepest nesting a JSON body may have; every API object is a few levels deep.
MAX_JSON_DEPTH = 32


def _no_constant(name: str) -> Any:
    # RFC 8259 §6: "Numeric values that cannot be represented ... such as
    # Infinity and NaN are not permitted"; PostgreSQL's jsonb refuses them too.
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json_object(raw: bytes) -> Any:
    """Decode a request body as strict JSON (RFC 8259) that PostgreSQL can
    store: no NaN/Infinity, no NUL character and no lone surrogate in any
    string (text and jsonb refuse both), at most ``MAX_JSON_DEPTH`` levels.
    Anything else is a 400, never a 500."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {exc}") from None
    # Iterative walk: a body nested just under the recursion limit must not
    # recurse again here.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value)
    return data


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise BadRequest("JSON strings must not contain the NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("JSON strings must not contain lone surrogates (\\ud800-\\udfff)") from None


def client_ip(request: web.Request) -> str:
    """The client's address, through trusted proxies (server.proxy)."""
    return client_address(request)


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].http.public_url
    if configured:
        return configured.rstrip("/")
    # https over TLS or behind a trusted proxy that says so: the links and
    # QR codes a phone opens must be secure contexts.
    return f"{request_scheme(request)}://{request.host}"


#: Production roles that may publish (WHIP) a stream without a publish link.
PUBLISH_ROLES = ("admin", "director")


async def authorize_stream(request: web.Request, name: str, action: str) -> tuple[Principal, Any]:
    """Who may read (WHEP) or publish (WHIP) stream ``name``: a signed link
    for that stream and action, or a user of its production — any member to
    read, a director (or admin) to publish. Returns the principal and the
    directory entry."""
    p = await principal(request)
    row = await stream_entry(request, name)
    if row is None:
        raise NotFound("no such stream")
    if p.kind == "link":
        assert p.link is not None
        if p.link.stream != name or p.link.action != action:
            verb = "watching" if action == "read" else "publishing"
            raise Forbidden(f"this link is not for {verb} this stream")
        return p, row
    role = await production_role(request, p, row.production_id)
    if action == "read" and role is None:
        raise Forbidden("not a member of this stream's production")
    if action == "publish" and role not in PUBLISH_ROLES:
        raise Forbidden("publishing needs a publish link or the director role in this stream's production")
    return p, row


async def register_grant(request: web.Request, what: str, p: Principal, entry: Any, roles: tuple[str, ...],
                         session: Any, close: Callable[[str], None]) -> None:
    """Keep what a new WHEP/WHIP ``session`` was admitted with, so revoking
    the link, deleting the stream or taking the user's role away ends it
    (issue 9 item 5; :mod:`server.grants`)."""
    role = None if p.kind == "link" else await production_role(request, p, entry.production_id)
    request.app[DIRECTORY].grants.add(session, Grant(
        what, entry.production_id, close, lambda: not session.closed, stream=entry.name, stream_id=entry.id,
        link=p.link, user_id=p.user_id, roles=() if role in (None, "admin") else roles))


def owner_key(p: Principal) -> str:
    """Who a session belongs to: a user, or the signed link that created it."""
    return f"user:{p.user_id}" if p.kind == "user" else f"link:{p.link.jti if p.link else ''}"


#: Separates a session id from its capability in the session URL's last
#: segment (neither contains it: both are URL-safe base64).
_KEY_SEP = "."


def _capability(request: web.Request, kind: str, session_id: str, owner: str) -> str:
    mac = hmac.new(request.app[SESSION_SECRET], f"{kind}\0{session_id}\0{owner}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()[:24]).decode()  # 192 bits: unguessable


def session_location(request: web.Request, kind: str, stream: str, session_id: str, owner: str) -> str:
    """The ``Location`` of a new session (RFC 9725 §4.2).

    A client that authenticated with ``?token=`` (Eyevinn's player, ffmpeg's
    WHIP muxer given a URL with the token) sends its later DELETE/PATCH to
    this URL as it is, without the token. Such sessions get a capability URL
    instead (knowing the URL is the authority to act on the session, as
    with the token it was created with): a key in the last path segment
    (``/whep/s/<id>.<key>``), an HMAC of the session and its owner, valid
    for that session only. In the path, not the query, because clients
    append their own ``?token=`` to it. A client that sent
    ``Authorization: Bearer`` keeps using its header (no capability in the
    URL, where it would end up in access logs)."""
    path = f"/{kind}/{stream}/{session_id}"
    if request.headers.get("Authorization") or not request.query.get("token"):
        return path
    return f"{path}{_KEY_SEP}{_capability(request, kind, session_id, owner)}"


async def session_access(request: web.Request, kind: str, sessions: Mapping[str, Any]) -> tuple[str, Any]:
    """The session a request to a session URL names, if the caller may act
    on it: the holder of its URL capability, or a principal that owns it
    (or an admin; for WHIP also a director of the stream's production).
    Returns a label for the logs and the session; raises 401/403/404."""
    session_id, sep, key = request.match_info["session"].partition(_KEY_SEP)
    has_token = bearer_token(request) is not None
    if not sep and not has_token:
        raise Unauthorized()
    session = sessions.get(session_id)
    if session is None or session.stream_name != request.match_info["stream"]:
        raise NotFound("no such session")
    if sep and hmac.compare_digest(key.encode(), _capability(request, kind, session.id, session.owner).encode()):
        return "session key", session
    if not has_token:
        raise Forbidden("the key does not open this session")
    p = await principal(request)
    if session.owner == owner_key(p) or p.is_admin:
        return p.label, session
    if kind == "whip":
        # A director of the stream's production may end anyone's publishing.
        row = await stream_entry(request, session.stream_name)
        role = None if row is None or p.kind != "user" else await production_role(request, p, row.production_id)
        if role in PUBLISH_ROLES:
            return p.label, session
    raise Forbidden("this session belongs to someone else")
