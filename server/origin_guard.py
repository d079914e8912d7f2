"""Cross-site and DNS-rebinding protection, in front of every route.

A researcher browses the web on the machine the server runs on, so any page they open can make
their browser send requests to ``http://127.0.0.1:8000``. Browsers mark such requests, and this
guard refuses them before any route (or the token check) runs:

- **Host** (DNS rebinding): a page on ``attacker.example`` whose name is re-pointed at 127.0.0.1
  talks to the server as its own origin, but its requests still say ``Host: attacker.example``.
  Only loopback names, the bound address and ``NEUROLENS_ALLOWED_HOSTS`` are served (421).
- **Cross-site** (CSRF): a request that changes something and that the browser marks as coming
  from another site (``Sec-Fetch-Site``) or another origin (``Origin``) is refused (403). Any
  ``/api/`` request marked cross-site is refused too: the API has no reason to serve other sites.
- **Content-Type**: an HTML form can send ``text/plain`` or form-encoded bodies anywhere without
  asking; our endpoints take JSON, or raw bytes for uploads, so anything else is refused (415).

Clients outside a browser (curl, httpx, the CLI, the trainer) send neither ``Origin`` nor
``Sec-Fetch-Site`` and a loopback ``Host``, so they pass unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from starlette.routing import Match, Mount, Router
from starlette.types import ASGIApp, Receive, Scope, Send

# One JSON error writer for every guard; it is module-private there only by its name.
from server.security import _send_json as send_json

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# The routes whose body is the raw file; every other body is JSON.
OCTET_STREAM_ROUTES = (("POST", re.compile(r"^/api/artifacts/?$")),
                       ("PATCH", re.compile(r"^/api/artifacts/uploads/[^/]+/?$")))
# tus 1.0's PATCH (server/api/tus.py) has a media type of its own.
TUS_PATCH = re.compile(r"^/api/tus/[^/]+/?$")
# Sec-Fetch-Site "same-site" includes other ports of the same host: another local server is
# exactly the attacker this guard is for.
FOREIGN_SITES = {"cross-site", "same-site"}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
WILDCARD_BINDS = {"", "0.0.0.0", "::"}


def split_host(value: str) -> tuple[str, str]:
    """``"[::1]:8000"`` -> ``("::1", "8000")``; ``"Example.org"`` -> ``("example.org", "")``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest.removeprefix(":")
    name, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return name.rstrip("."), port


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def takes(router: Router, scope: Scope) -> bool:
    """Whether an endpoint of ``router`` takes this request's method at its path.

    Mounts are passed over (the dashboard's static files at "/" match every path); an included
    router answers for its own routes, whichever way FastAPI keeps them.
    """
    return any(not isinstance(route, Mount) and route.matches(scope)[0] == Match.FULL for route in router.routes)


def methods_taken(router: Router, scope: Scope) -> list[str]:
    """The methods some endpoint of ``router`` takes at this request's path (for ``Allow``)."""
    return [method for method in HTTP_METHODS if takes(router, {**scope, "method": method})]


def expected_content_type(method: str, path: str) -> str:
    if method == "PATCH" and TUS_PATCH.match(path):
        return "application/offset+octet-stream"
    for route_method, pattern in OCTET_STREAM_ROUTES:
        if method == route_method and pattern.match(path):
            return "application/octet-stream"
    return "application/json"


class OriginGuardMiddleware:
    """Refuse foreign Host headers (421), cross-site changes (403) and unexpected bodies (415).

    Parameters
    ----------
    app
        The application to guard.
    bind_host
        The address the server listens on; it is an allowed Host. Bound to a wildcard, any IP
        literal is allowed, since the addresses a LAN client uses are not known in advance (an IP
        literal cannot be rebound: the page's origin then is the server itself).
    allowed_hosts
        Further names to serve (``NEUROLENS_ALLOWED_HOSTS``), e.g. the machine's LAN name.
    router
        The application's router: a body's type is judged only for a method and path one of its
        routes takes, so that an unknown path stays a 404 and an unknown method a 405.
    """

    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: frozenset[str] = frozenset(),
                 router: Router | None = None) -> None:
        self.app = app
        self.router = router
        self.any_ip = bind_host in WILDCARD_BINDS
        self.names = LOOPBACK_NAMES | {split_host(bind_host)[0]} | {name.lower().rstrip(".") for name in allowed_hosts}
        self.names.discard("")

    def host_allowed(self, host: str) -> bool:
        name, port = split_host(host)
        if port and not port.isdigit():  # "localhost:1@evil": no browser sends it, nor do we serve it
            return False
        ip = _ip(name)
        ip = getattr(ip, "ipv4_mapped", None) or ip  # [::ffff:127.0.0.1] is 127.0.0.1
        if ip is not None and (ip.is_loopback or self.any_ip):
            return True
        return name in self.names or name.endswith(".localhost")  # RFC 6761: always loopback

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """The status and message refusing this request, or None to let it through."""
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        method, path = scope.get("method", "GET"), scope["path"]
        host = headers.get("host")
        # No Host at all is an HTTP/1.0 client, never a browser (browsers always send one).
        if host is not None and not self.host_allowed(host):
            allowed = ", ".join(sorted(self.names | {"127.0.0.1", "::1"}))
            return 421, (f"This server does not answer to Host {host!r} (a page re-pointing its name at this "
                         f"machine looks like this). Allowed hosts: {allowed}"
                         f"{', any IP address' if self.any_ip else ''}; add names with NEUROLENS_ALLOWED_HOSTS.")
        site = headers.get("sec-fetch-site", "").lower()
        changes = method in STATE_CHANGING
        if site in FOREIGN_SITES and (changes or path.startswith("/api/")):
            return 403, (f"Refused a {method} {path} that the browser marks as sent from another site "
                         f"(Sec-Fetch-Site: {site}); use the dashboard on this server, the CLI or the API directly.")
        origin = headers.get("origin")
        if changes and origin is not None and not self.same_origin(origin, host):
            return 403, (f"Refused a {method} {path} from the page at {origin!r}: only pages served by this "
                         "server itself may change anything here.")
        if changes and self.routes(scope):
            return self.content_type_refusal(method, path, headers)
        return None

    def routes(self, scope: Scope) -> bool:
        """Whether a route of the application takes this method at this path."""
        return self.router is None or takes(self.router, scope)

    @staticmethod
    def same_origin(origin: str, host: str | None) -> bool:
        """Whether ``Origin`` names the host and port the request was sent to (``null`` never does)."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
            return False
        default = "443" if parts.scheme == "https" else "80"
        origin_name, origin_port = split_host(parts.netloc)
        host_name, host_port = split_host(host)
        return origin_name == host_name and (origin_port or default) == (host_port or default)

    @staticmethod
    def content_type_refusal(method: str, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        expected = expected_content_type(method, path)
        declared = headers.get("content-type")
        if declared is None:
            # A body without a type is what a no-cors fetch of a Blob sends, and a browser sends
            # Origin with every such fetch; a program (httpx's content=, urllib) that sends
            # neither Origin nor Sec-Fetch-Site is not a web page, and an empty body (a bodiless
            # POST such as cancel) needs no type at all.
            has_body = headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers
            from_browser = "origin" in headers or "sec-fetch-site" in headers
            if not has_body or not from_browser:
                return None
            return 415, f"A body to {method} {path} needs 'Content-Type: {expected}'; none was given."
        if declared.split(";")[0].strip().lower() != expected:
            curl = f" (with curl: -H 'Content-Type: {expected}')" if expected.endswith("octet-stream") else ""
            return 415, f"{method} {path} takes 'Content-Type: {expected}'{curl}, not {declared!r}."
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":  # the server has no websocket routes
            refused = self.refusal(scope)
            if refused is not None:
                await send_json(send, *refused)
                return
        await self.app(scope, receive, send)
