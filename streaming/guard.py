"""Who may use the server: the Host and Origin checks every route makes, and errors as one-sentence JSON.

    policy = AccessPolicy.for_bind("127.0.0.1", 8080, allow_hosts=("studio.lan",), allow_origins=())
    app = web.Application(middlewares=[guard(lambda: policy)])

Why. The server hands out a live camera programme and takes WebRTC offers that cost a renderer each. A web page
on another site must not use it through the visitor's browser:
  * DNS rebinding: a page whose domain re-resolves to 127.0.0.1 reaches the server as "same origin" of that domain;
    its requests carry `Host: evil.example:8080`. Only the address the server is bound to (and, for a loopback
    bind, its loopback names; for a wildcard bind, IP literals and this machine's name) or a `--allow-host` name
    is served: anything else is 403.
  * Cross-site requests: a page on another origin can POST to /offer (a `text/plain` form post needs no CORS
    preflight) and fill every session slot. A request that carries an `Origin` header must come from this server's
    own origin (or a `--allow-origin` one): else 403. /offer takes `application/json` only (415), which a
    cross-site page cannot send without a CORS preflight, which this server never grants.
Requests without an `Origin` header (a typed URL, OBS's browser source loading /viewer, curl, the aiortc clients)
pass the Origin check: only browsers attach it, and they attach it to every cross-origin fetch and every POST.

Every refusal and every HTTP error (404, 405, 413, ...) answers `{"error": "<one sentence>"}`.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """'name:port' / '[::1]:port' / 'name' -> (lower-case name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):  # IPv6 literal
        end = value.find("]")
        if end < 0:
            return value, None
        name, rest = value[1:end], value[end + 1:]
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:  # a bare name, or a bare IPv6 address (no port)
        name, port = value, None
    try:
        return name, None if port is None else int(port)
    except ValueError:
        return name, -1  # not a port: never matches


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    """Hosts and origins the server answers. `names`: host names accepted with the bound port (or without a port
    when it is the scheme's default); `host_ports`: exact (name, port) pairs (from `--allow-host name:port`);
    `any_ip`: a wildcard bind answers any IP literal (a rebinding page always sends a domain name)."""

    port: int
    names: frozenset[str]
    host_ports: frozenset[tuple[str, int]] = frozenset()
    any_ip: bool = False
    origins: frozenset[str] = frozenset()
    scheme: str = "http"

    @classmethod
    def for_bind(cls, host: str, port: int, allow_hosts=(), allow_origins=(), scheme: str = "http") -> "AccessPolicy":
        host = (host or "").strip("[]").lower()
        names = set()
        wildcard = host in WILDCARDS
        if wildcard or is_loopback(host):
            names |= set(LOOPBACK_NAMES)
        if wildcard:
            hostname = socket.gethostname().lower()
            names |= {hostname, f"{hostname}.local"}
        elif host:
            names.add(host)
        host_ports = set()
        for entry in allow_hosts:
            name, p = split_host(entry)
            if p is None:
                names.add(name)
            else:
                host_ports.add((name, p))
        origins = frozenset(o.strip().rstrip("/").lower() for o in allow_origins)
        return cls(port, frozenset(names), frozenset(host_ports), wildcard, origins, scheme)

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False  # HTTP/1.1 requires Host; a request without one is not from a browser page
        name, port = split_host(header)
        if (name, port) in self.host_ports:
            return True
        default = {"http": 80, "https": 443}[self.scheme]
        if port != self.port and not (port is None and self.port == default):
            return False
        return name in self.names or (self.any_ip and _is_ip(name))

    def origin_ok(self, origin: str | None, host_header: str) -> bool:
        if origin is None:
            return True
        origin = origin.strip().rstrip("/").lower()
        return origin == f"{self.scheme}://{host_header.strip().lower()}" or origin in self.origins


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


HTTP_ERRORS = {
    404: "There is no such page: the server has / (camera), /viewer (OBS), /offer and /stats.",
    405: "This route does not take that method: GET /, /viewer and /stats; POST /offer.",
    413: "The request body is too large: POST /offer takes one SDP offer of a few kilobytes as JSON.",
}


def guard(policy: Callable[[], AccessPolicy]):
    """aiohttp middleware: Host, Origin and (for POST) Content-Type checks, then HTTP errors as JSON."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        p = policy()
        host = request.headers.get("Host")
        if not p.host_ok(host):
            return _json_error(403, f"Host {host!r} is not this server's address: open it as "
                                    f"{p.scheme}://127.0.0.1:{p.port}/ or the address it was started on, or "
                                    "start flashlive serve with --allow-host NAME.")
        origin = request.headers.get("Origin")
        if not p.origin_ok(origin, host):
            return _json_error(403, f"Requests from the page at {origin} are refused: only this server's own pages "
                                    "may use it, or start flashlive serve with --allow-origin ORIGIN.")
        if request.method == "POST" and request.content_type != "application/json":
            return _json_error(415, f"POST {request.path} takes Content-Type application/json, not "
                                    f"{request.content_type or 'none'}: send the offer as JSON.")
        try:
            return await handler(request)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            return _json_error(err.status, HTTP_ERRORS.get(err.status, f"The request failed ({err.reason})."))

    return middleware
