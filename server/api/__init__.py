"""REST API v1: auth, users, productions, members, streams, signed links.

One module per resource, each with its own ``setup(app)``; this package only
lists them (in route registration order). Shapes follow DESIGN.md
"Interfaces". Authorisation:

* admin: everything;
* director (user role): may create productions (and becomes their director);
  within a production, members with production role ``director`` manage its
  streams, members, links and tally;
* camera / viewer: read the productions and streams they are members of
  (stream passphrases are shown to directors and admins only);
* a signed stream link acts only on its one stream and action.

    auth         login, refresh, logout, me; refresh-token purge
    users        server users (admin)
    productions  productions and their members
    streams      streams, SRT/WHIP/WHEP URLs, live state
    links        signed stream links, revocation
    common       field checks, production lookup, reloads after a change
    srt_urls     SRT caller URLs
"""

from __future__ import annotations

from aiohttp import web

from . import auth, links, productions, streams, users

ROUTE_MODULES = (auth, users, productions, streams, links)


def setup(app: web.Application) -> None:
    for module in ROUTE_MODULES:
        module.setup(app)
