"""Who may talk to `odlora serve`: checked on every request, whatever the route (the page, /v1/*,
/odlora/*), before any route runs.

- **Host**: one of the names this server answers to, with any port: the loopback names
  (127.0.0.1, localhost, [::1]), the address it was told to listen on when that is a concrete one,
  and each `--allow-host NAME`. Another name is a 403: that is how a DNS-rebinding page (a site whose
  name an attacker points at 127.0.0.1) is kept from reading a user's adapters' answers.
- **Origin**: when a browser sends one, it must be this very server (`http(s)://` + the Host) or
  one of the `--cors-origin` sites (off by default; `*` is any site); another site's page gets a
  403, whatever it asks (a CSRF'd job, a chat completion, the state). For the `--cors-origin`
  sites, Starlette's CORSMiddleware (outside this guard) answers the browser's preflight and adds
  the CORS headers, so that such a page can read the answers.
- **API key** (`--api-key`, or env ODLORA_API_KEY): when set, every request must carry
  `Authorization: Bearer KEY` (compared in constant time), or a 401. The page cannot add a header
  to its own loading, so it gets the key once through its address: opening `/?key=KEY` answers with
  a redirect to `/` that sets an HttpOnly, SameSite=Strict cookie holding a token derived from the
  key (never the key itself), which then stands for the header on every same-site request the page
  makes; the key leaves the address bar at once.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse

from ..errors import OdloraError
from .openai_schema import APIError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
KEY_QUERY = "key"  # /?key=KEY, once, to let the page in
SESSION_COOKIE = "odlora_session"


@dataclass(frozen=True)
class Access:
    hosts: frozenset  # lower-case host names, without port or brackets
    api_key: Optional[str] = None
    cors_origins: frozenset = frozenset()  # other sites whose pages may call (`scheme://host[:port]`, or "*")

    @classmethod
    def build(cls, bind_host: str, allow_hosts: Iterable[str] = (), api_key: Optional[str] = None,
              cors_origins: Iterable[str] = ()) -> "Access":
        """The loopback names, the bound address unless it is a wildcard, and `allow_hosts`."""
        hosts = set(LOOPBACK_NAMES)
        for name in allow_hosts:
            hosts.add(checked_host(name))
        if bind_host not in WILDCARDS:
            hosts.add(bind_host.strip("[]").lower())
        if api_key is not None and not (api_key and api_key.isascii() and api_key.isprintable() and " " not in api_key):
            raise OdloraError("use a non-empty key of printable ASCII without spaces", param="api_key")
        return cls(frozenset(hosts), api_key, frozenset(checked_origin(o) for o in cors_origins))

    def allows_origin(self, origin: str, host: str) -> bool:
        """This very server (an Origin naming the Host), or a --cors-origin site."""
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower():
            return True
        return "*" in self.cors_origins or origin.lower() in self.cors_origins

    @property
    def session_token(self) -> str:
        """What the page's cookie holds: bound to the key, useless as the key itself."""
        return hmac.new(self.api_key.encode(), b"odlora web page session", hashlib.sha256).hexdigest()


def checked_host(name: str) -> str:
    """An --allow-host value: a host name or IP address, without scheme, port or path."""
    bare = name.strip().strip("[]").lower()
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        pass
    labels = bare.split(".")
    if not bare or len(bare) > 253 or not all(label and len(label) <= 63 and label.replace("-", "").isalnum()
                                              and label.isascii() for label in labels):
        raise OdloraError(f"{name!r}: give a host name or an IP address (no scheme, port or path)", param="allow_hosts")
    return bare


def checked_origin(origin: str) -> str:
    """A --cors-origin value: `*`, or a site as a browser's Origin header names it (`https://app.example:8443`)."""
    if origin == "*":
        return origin
    try:
        parts = urlsplit(origin)
        valid = parts.scheme in ("http", "https") and parts.hostname and not (parts.path or parts.query
                                                                              or parts.fragment)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        valid = False
    if not valid:
        raise OdloraError(f"{origin!r}: give a site as http(s)://host[:port], or *", param="cors_origins")
    return origin.lower()


def host_name(header: str) -> Optional[str]:
    """The name in a Host header (`127.0.0.1:8000`, `[::1]:8000`, `localhost`), lower-case; None if malformed."""
    try:
        return urlsplit(f"//{header}").hostname
    except ValueError:
        return None


class Guard:
    """ASGI middleware: the Host/Origin allow-list, then the API key, then the app."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            check_site(request, self.access)
            let_in = check_key(request, self.access)
        except APIError as e:
            await e.response()(scope, receive, send)
            return
        if let_in:
            await session_redirect(self.access)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def check_site(request: Request, access: Access) -> None:
    host = request.headers.get("host", "")
    if host_name(host) not in access.hosts:
        raise APIError(403, f"Host {host!r} is not a name this server answers to (odlora serve --allow-host NAME "
                            f"adds one)", code="host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None and not access.allows_origin(origin, host):
        raise APIError(403, f"cross-origin request from {origin!r} refused (odlora serve --cors-origin SITE "
                            f"allows one)", code="cross_origin")


def check_key(request: Request, access: Access) -> bool:
    """Nothing to check without a key; else the Bearer header or the page's cookie lets a request
    through, and a correct `?key=` on a GET asks for the cookie (True). Anything else is a 401."""
    if access.api_key is None:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and same(given.strip(), access.api_key):
        return False
    if same(request.cookies.get(SESSION_COOKIE, ""), access.session_token):
        return False
    query_key = request.query_params.get(KEY_QUERY)
    if request.method == "GET" and query_key is not None and same(query_key, access.api_key):
        return True
    raise APIError(401, "this server needs its API key: send `Authorization: Bearer KEY` (the web page: open "
                        "/?key=KEY once)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def same(given: str, expected: str) -> bool:
    """Constant-time equality, for any text a client sends (compare_digest takes ASCII str only)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def session_redirect(access: Access) -> RedirectResponse:
    """To the page (always `/`: never a client-chosen address), with the session cookie."""
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, access.session_token, path="/", httponly=True, samesite="strict")
    return response
