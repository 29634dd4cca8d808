"""Outbound HTTP to user-given URLs (input files, webhooks) without server-side request forgery.

A user who can make the server fetch a URL must not be able to reach what only the server
can reach: loopback, the cluster's private network, the cloud metadata service. So every
outbound connection made through :func:`guarded_client` goes

    host name -> resolve (our resolver, bounded time) -> refuse if ANY address is in a
    forbidden class -> connect to the vetted address itself

inside the connection layer (an httpcore network backend), which means the check runs for
the first request, for every redirect hop and for every new connection, and the address we
connect to is the one we checked: no second DNS lookup that a rebinding name could answer
differently. TLS still verifies the certificate against the URL's host name (httpcore passes
it as the server name). Hosts in ``LIP_SYNC_URL_ALLOWLIST`` skip the address check (a bucket
gateway on the private network; the tests' loopback file server).

A name that does not resolve and one that resolves to a forbidden address get the same answer
(``<host> refused: it cannot be reached from this service``): two answers would let a caller
map internal DNS. The server's log keeps the reason.

A :class:`SocketWatch` given to :func:`guarded_client` holds the sockets of one fetch, so that
another thread can stop it at once (a cancelled job, a deadline): see :mod:`.fetch`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from lipsync_runner.errors import InvalidInputError
from lipsync_runner.config import OutboundSettings

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses`` as strings; raises OSError when the name does not resolve."""

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=2)

_net = ipaddress.ip_network
# Checked in this order, so an address gets the most specific name (metadata before link-local).
FORBIDDEN_CLASSES: tuple[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...] = (
    ("metadata", (_net("169.254.169.254/32"), _net("fd00:ec2::254/128"), _net("100.100.100.200/32"))),
    ("unspecified", (_net("0.0.0.0/8"), _net("::/128"))),
    ("loopback", (_net("127.0.0.0/8"), _net("::1/128"))),
    ("link-local", (_net("169.254.0.0/16"), _net("fe80::/10"))),
    ("private", (_net("10.0.0.0/8"), _net("172.16.0.0/12"), _net("192.168.0.0/16"), _net("fc00::/7"))),
    ("CGNAT", (_net("100.64.0.0/10"),)),
    ("multicast", (_net("224.0.0.0/4"), _net("ff00::/8"))),
    ("broadcast", (_net("255.255.255.255/32"),)),
)
_NAT64 = _net("64:ff9b::/96")


class URLRefusedError(InvalidInputError):
    """A URL the server will not fetch (scheme, address class, allow-list); 400."""


def _unreachable(host: str, reason: str) -> URLRefusedError:
    """One answer whether the name does not resolve or resolves to a forbidden address; the reason is logged."""
    log.info("outbound request to %s refused: %s", host, reason)
    return URLRefusedError(f"{host} refused: it cannot be reached from this service")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), which is what gets reached."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_class(address: str | IPAddress) -> str | None:
    """Why an address must not be connected to (``"loopback"``, ``"private"``, ...), or None if it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return forbidden_class(inner)
    for name, networks in FORBIDDEN_CLASSES:
        if any(ip.version == n.version and ip in n for n in networks):
            return name
    if not ip.is_global:  # documentation, benchmarking, 240/4 and the other special-purpose blocks
        return "reserved"
    return None


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def parse_allowlist(value: str | Iterable[str] | None) -> frozenset[str]:
    """``LIP_SYNC_URL_ALLOWLIST``: comma-separated host names or IP literals; ``*.example.com`` for subdomains."""
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(_normal_host(i) for i in items if i.strip())


def host_allowed(host: str, allowlist: frozenset[str]) -> bool:
    host = _normal_host(host)
    if host in allowlist:
        return True
    return any(entry.startswith("*.") and host.endswith(entry[1:]) for entry in allowlist)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_resolver_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AddressPolicy:
    """Which hosts outbound requests may reach, and how names are resolved."""

    allowlist: frozenset[str] = frozenset()
    resolver: Resolver = system_resolver
    resolve_timeout_s: float = 10.0

    def check_url(self, url: str, what: str = "URL") -> httpx.URL:
        """Refuse what can be refused without DNS: the scheme, a missing host, a forbidden IP literal."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise URLRefusedError(f"{what} is not a valid URL") from None
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise URLRefusedError(f"{what}: only http and https URLs are fetched (not {parsed.scheme or 'none'}://)")
        host = parsed.host
        if not host:
            raise URLRefusedError(f"{what} has no host")
        if _is_ip_literal(host) and not host_allowed(host, self.allowlist):
            reason = forbidden_class(host)
            if reason:
                raise URLRefusedError(f"{what} refused: {host} is a {reason} address")
        return parsed

    def vet(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``; URLRefusedError when it must not be reached."""
        host = _normal_host(host)
        if _is_ip_literal(host):
            addresses = [host]
        else:
            future = _resolver_pool.submit(self.resolver, host, port)
            try:
                addresses = list(future.result(timeout=self.resolve_timeout_s))
            except FutureTimeout:
                raise _unreachable(host, f"the name did not resolve within {self.resolve_timeout_s:g} s") from None
            except OSError as e:
                raise _unreachable(host, f"the name does not resolve ({e})") from None
            if not addresses:
                raise _unreachable(host, "the name resolves to no address")
        if host_allowed(host, self.allowlist):
            return addresses
        for address in addresses:
            reason = forbidden_class(address)
            if reason:
                raise _unreachable(host, f"it resolves to {address}, a {reason} address")
        return addresses


def default_policy(resolve_timeout_s: float = 10.0, outbound: OutboundSettings | None = None) -> AddressPolicy:
    """The deployment's policy: ``LIP_SYNC_URL_ALLOWLIST`` and the system resolver."""
    outbound = outbound or OutboundSettings()
    return AddressPolicy(allowlist=parse_allowlist(outbound.url_allowlist), resolve_timeout_s=resolve_timeout_s)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (yet, or any more): nothing to wake
        pass


class SocketWatch:
    """The sockets of one fetch, so that another thread can stop it now (a cancel, a deadline).

    httpx's timeouts are per read: an origin that sends a byte every few seconds holds a read
    open as long as it likes. :meth:`stop` shuts every socket down, and a read blocked on one
    in another thread returns at once. Each socket is kept as a duplicate descriptor: TLS wraps
    (and detaches) the socket object it is given, and a shutdown through any descriptor ends the
    connection itself. :meth:`close` when the fetch is over (the duplicates hold the sockets open).
    """

    def __init__(self, deadline: float = math.inf) -> None:
        self.deadline = deadline  # time.monotonic() by which the fetch must be over: no connect waits past it
        self.error: Exception | None = None  # set by stop(): what the fetch raises
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock.dup())
            if self.error is not None:  # stopped while it connected
                _shutdown(self._socks[-1])

    def stop(self, error: Exception) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            for sock in self._socks:
                _shutdown(sock)

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's TCP connect, to addresses the policy vetted (the check and the connect are one step).

    With a ``watch``, each socket is registered with it, and no connect starts after it stopped
    or waits past its deadline.
    """

    def __init__(self, policy: AddressPolicy, inner: httpcore.NetworkBackend | None = None,
                 watch: SocketWatch | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.SyncBackend()
        self.watch = watch

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Iterable[Any] | None = None
                    ) -> httpcore.NetworkStream:
        addresses = self.policy.vet(host, port)
        last: Exception | None = None
        for address in addresses:
            if self.watch is not None:
                self.watch.check()
                left = max(0.05, self.watch.deadline - time.monotonic())  # never 0: that is non-blocking
                timeout = left if timeout is None else min(timeout, left)
            try:
                stream = self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
                continue
            sock = stream.get_extra_info("socket")
            if self.watch is not None and isinstance(sock, socket.socket):
                try:
                    self.watch.add(sock)
                except BaseException:  # out of descriptors, say: never leave the connection behind
                    stream.close()
                    raise
            return stream
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise URLRefusedError("unix sockets are not reachable by URL")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """Certificate-verifying TLS context (certifi's CAs), made once: loading the CAs takes a fifth of a second."""
    return httpx.create_ssl_context(verify=True, trust_env=False)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection goes through :class:`GuardedBackend`.

    httpx has no public argument for the network backend, so the connection pool it builds
    is replaced by an equal one with ours (httpx is pinned; tests fail if this stops working).
    No proxies from the environment: a proxy would do the resolving, out of our sight.
    """

    def __init__(self, policy: AddressPolicy, *, ssl_context: ssl.SSLContext | None = None,
                 limits: httpx.Limits = DEFAULT_LIMITS, watch: SocketWatch | None = None) -> None:
        ssl_context = ssl_context or _ssl_context()
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        self.backend = GuardedBackend(policy, watch=watch)
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=self.backend,
        )


def guarded_client(policy: AddressPolicy, *, timeout: httpx.Timeout, follow_redirects: bool = False,
                   max_redirects: int = 5, headers: dict[str, str] | None = None,
                   ssl_context: ssl.SSLContext | None = None, watch: SocketWatch | None = None) -> httpx.Client:
    """An ``httpx.Client`` that can reach only what ``policy`` allows, on every hop.

    ``ssl_context``: default, certifi's CAs with host name checks (tests pass one that trusts their CA).
    ``watch``: registers the client's sockets, so that another thread can stop its requests.
    """
    return httpx.Client(transport=GuardedTransport(policy, ssl_context=ssl_context, watch=watch), timeout=timeout,
                        follow_redirects=follow_redirects,
                        max_redirects=max_redirects, headers=headers, trust_env=False)


def redact_url(url: str) -> str:
    """A URL fit for logs and messages: scheme, host, port and path; no credentials, no query.

    Presigned bucket URLs carry their signature in the query; a webhook URL may carry a secret.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
