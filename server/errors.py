"""HTTP API errors: every 4xx/5xx leaves the server as JSON ``{error, detail}``.

Hierarchy::

    ApiError                   status + short machine code + human detail
    ├── BadRequest             400 bad_request (malformed JSON, wrong types)
    ├── Unauthorized           401 unauthorized (no/forged/expired token)
    ├── Forbidden              403 forbidden (right token, wrong role/production)
    ├── NotFound               404 not_found
    ├── MethodNotAllowed       405 method_not_allowed
    ├── Conflict               409 conflict (name taken, stream not live)
    ├── PreconditionFailed     412 precondition_failed (stale ETag)
    ├── PayloadTooLarge        413 payload_too_large
    ├── UnsupportedMediaType   415 unsupported_media_type
    ├── Unprocessable          422 unprocessable (well-formed but unusable)
    ├── PreconditionRequired   428 precondition_required (missing If-Match)
    ├── TooManyRequests        429 too_many_requests (+ Retry-After)
    └── ServiceUnavailable     503 unavailable (+ Retry-After)
        └── DatabaseUnavailable  503 database_unavailable (+ Retry-After):
                                 the route needs PostgreSQL and it is away

Handlers raise these; the error middleware renders them. Anything else that
escapes a handler is logged with its traceback and answered 500 ``internal``
without details.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class ApiError(Exception):
    status = 500
    code = "internal"

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> web.Response:
        body = {"error": self.code, "detail": self.detail, **self.extra}
        return json_error(self.status, body, self.headers)


#: The ``error`` code of an HTTP status that aiohttp raised or answered
#: itself (404, 405, 413 and the parser's refusals).
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "unprocessable", 429: "too_many_requests"}


def json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers=headers)


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str = "authentication required", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="returnfeed"'})
        super().__init__(detail, **kw)


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PreconditionFailed(ApiError):
    status, code = 412, "precondition_failed"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "unprocessable"


class PreconditionRequired(ApiError):
    status, code = 428, "precondition_required"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after + 0.999)))})


class ServiceUnavailable(ApiError):
    status, code = 503, "unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """The route needs the database and it is frozen, down or restarting.

    Raised at once while the supervisor knows the database is down, else
    within the short acquire/statement budget (under 1 s), never after a
    long driver timeout.
    """

    code = "database_unavailable"

    def __init__(self, detail: str = "the database is unavailable; try again shortly",
                 retry_after: int = 2) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})
