"""Fetch the bytes behind an http(s) image URL under a `FetchPolicy`, checked on every hop.

This module knows where an image URL may lead: which schemes and hosts are allowed, which
resolved addresses are public, how many redirects are followed, and how long and how large a
download may be. It follows redirects itself, and before every connection it resolves the
host once, checks every address the resolver returned, and connects to a checked address
(the Host header and TLS SNI / certificate check still use the name), so a second DNS answer
cannot swap in an internal address between the check and the connection.

Its errors never quote what a server sent (body, Content-Type, status text, Location): they
name the URL the caller gave, say what was refused or failed, and what to do. The details of
a refusal go to the log, for the operator. It knows nothing of image formats (`images.py`
decodes) or of servers (`nvlm_server` decides the policy and runs fetches in its own pool).
"""

from __future__ import annotations

import http
import http.client
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Union
from urllib.parse import urljoin, urlsplit

from nvlm_engine.errors import ImageOptionsError, ImageSourceError, ImageTooLargeError, ImageURLRefusedError

__all__ = ["FetchPolicy", "fetch_url", "is_public_address"]

logger = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_SCHEMES = ("http", "https")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_HEADERS = {"User-Agent": "nvlm-engine", "Accept": "image/*", "Accept-Encoding": "identity"}
_PRIVATE_HINT = (
    "the operator can allow private addresses with allow_private_addresses=True "
    "(nvlm-serve --allow-private-image-hosts)"
)


@dataclass(frozen=True)
class FetchPolicy:
    """Where an image URL, and each redirect it leads to, may go.

    Attributes:
        schemes: URL schemes allowed on every hop (a subset of http, https).
        allowed_hosts: host names or IP literals that may be fetched, exact, or a suffix that
            starts with "." for subdomains (".example.com" allows "a.example.com", not
            "example.com"). Empty: any host. Checked on every hop.
        allow_private_addresses: connect to addresses that are not public (loopback,
            private, link-local, shared, reserved, multicast, unspecified, and IPv6 forms that
            embed them). Off: such an address is refused unless the URL's host is that IP
            literal and `allowed_hosts` lists it, which is an explicit permission too.
        max_redirects: redirects followed at most; one more is refused.
    """

    schemes: tuple[str, ...] = _SCHEMES
    allowed_hosts: tuple[str, ...] = ()
    allow_private_addresses: bool = False
    max_redirects: int = 3

    def __post_init__(self) -> None:
        schemes = tuple(s.lower() for s in self.schemes)
        if not schemes or any(s not in _SCHEMES for s in schemes):
            raise ImageOptionsError(f"FetchPolicy.schemes must be a non-empty subset of {_SCHEMES}; got {self.schemes}")
        if self.max_redirects < 0:
            raise ImageOptionsError(f"FetchPolicy.max_redirects must be >= 0; got {self.max_redirects}")
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "allowed_hosts", tuple(_normalize_host(h) for h in self.allowed_hosts))

    def host_allowed(self, host: str) -> bool:
        """Whether `host` (a name or IP literal, as in a URL) is on the allowlist (always, when it is empty)."""
        if not self.allowed_hosts:
            return True
        host = _normalize_host(host)
        return any(host == h or (h.startswith(".") and host.endswith(h)) for h in self.allowed_hosts)

    def address_allowed(self, host: str, address: IPAddress) -> bool:
        """Whether a connection to `address`, resolved from `host`, is allowed."""
        if self.allow_private_addresses or is_public_address(address):
            return True
        # An IP literal the operator listed is an explicit permission for that one address.
        literal = _ip_or_none(host)
        return literal is not None and literal == address and _normalize_host(host) in self.allowed_hosts


def is_public_address(address: IPAddress) -> bool:
    """True for a globally routable unicast address; IPv6 forms embedding IPv4 are judged by the IPv4 too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not is_public_address(embedded):
            return False
    special = (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
               or address.is_reserved or address.is_unspecified)
    return address.is_global and not special


def fetch_url(url: str, policy: FetchPolicy, *, max_bytes: int, timeout_s: float, deadline: float | None = None) -> bytes:
    """Download `url` under `policy`, following at most `policy.max_redirects` redirects.

    Args:
        url: an http(s) URL.
        policy: the schemes, hosts and addresses allowed on every hop.
        max_bytes: the most body bytes accepted; at most `max_bytes + 1` are ever read.
        timeout_s: the socket timeout, and the time limit of the whole fetch.
        deadline: an earlier `time.monotonic()` limit shared with other fetches (a server's
            per-request deadline); the fetch stops at whichever comes first.

    Returns:
        The body of the final 2xx response.

    Raises:
        ImageURLRefusedError: the URL or a redirect is refused by the policy (nothing was
            sent to the refused destination).
        ImageTooLargeError: the body is larger than `max_bytes`.
        ImageSourceError: the host cannot be resolved or reached, the server answered an
            error status or a malformed response, or time ran out.
    """
    clock = _Clock.start(url, timeout_s, deadline)
    current = url
    for hop in range(policy.max_redirects + 1):
        where = f"fetch {url!r}" if hop == 0 else f"follow redirect {hop} of {url!r}"
        target = _check_url(current, policy, where, hop)
        addresses = _resolve_checked(target, policy, where, hop, clock)
        response = _get(target, addresses, clock)
        try:
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise ImageSourceError(f"fetching {url!r} failed: a redirect without a Location header")
                current = urljoin(current, location.strip())
                continue
            if not 200 <= response.status < 300:
                raise ImageSourceError(f"fetching {url!r} failed: HTTP {response.status} {_phrase(response.status)}".rstrip())
            return _read_body(response, max_bytes, clock)
        finally:
            response.close()
    logger.info("image fetch %r: more than %d redirects, last to %r", url, policy.max_redirects, current)
    raise ImageURLRefusedError(
        f"refusing to follow the redirects of {url!r}: more than {policy.max_redirects} redirects; "
        "link the image's final URL directly"
    )


@dataclass(frozen=True)
class _Clock:
    """The time left to one fetch, and the errors that say it ran out."""

    url: str
    stop: float
    limit_s: float
    timeout_s: float

    @classmethod
    def start(cls, url: str, timeout_s: float, deadline: float | None) -> _Clock:
        now = time.monotonic()
        stop = now + timeout_s if deadline is None else min(now + timeout_s, deadline)
        return cls(url, stop, timeout_s if stop == now + timeout_s else max(0.0, stop - now), timeout_s)

    def remaining(self) -> float:
        left = self.stop - time.monotonic()
        if left <= 0:
            raise self.timeout()
        return left

    def timeout(self) -> ImageSourceError:
        return ImageSourceError(
            f"fetching {self.url!r} failed: download took longer than {self.limit_s:.1f} s; check the URL and "
            f"the network, or raise fetch_timeout_s (now {self.timeout_s} s)"
        )

    def failure(self, error: Exception) -> ImageSourceError:
        if isinstance(error, TimeoutError) or time.monotonic() >= self.stop:
            return self.timeout()
        return ImageSourceError(
            f"fetching {self.url!r} failed ({_describe(error)}); check the URL and the network, or raise "
            f"fetch_timeout_s (now {self.timeout_s} s)"
        )


# --- one hop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _check_url(url: str, policy: FetchPolicy, where: str, hop: int) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageURLRefusedError(f"refusing to {where}: malformed URL") from e
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in policy.schemes:
        shown = f" {scheme!r}" if hop == 0 else ""
        raise ImageURLRefusedError(f"refusing to {where}: scheme{shown} is not one of {', '.join(policy.schemes)}")
    if not host:
        raise ImageURLRefusedError(f"refusing to {where}: the URL names no host")
    if not policy.host_allowed(host):
        logger.info("image fetch: %s refused, host %r is not on the allowlist", where, host)
        shown = f" {host!r}" if hop == 0 else ""  # a redirect target is the remote server's text
        raise ImageURLRefusedError(
            f"refusing to {where}: host{shown} is not on the allowlist (allowed_hosts); "
            "ask the operator to add it, or send the image inline"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _resolve_checked(target: _Target, policy: FetchPolicy, where: str, hop: int, clock: _Clock) -> list[tuple[int, tuple]]:
    """Every address of the host, all checked; one refused address refuses the hop (no fallback to the others)."""
    clock.remaining()
    try:
        infos = _resolve(target.host, target.port)
    except (OSError, UnicodeError) as e:
        shown = f" {target.host!r}" if hop == 0 else " of the redirect target"
        raise ImageSourceError(f"cannot {where}: cannot resolve the host{shown}; check the URL") from e
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos if family in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise ImageSourceError(f"cannot {where}: the host has no IPv4 or IPv6 address")
    for _, sockaddr in addresses:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not policy.address_allowed(target.host, address):
            # The address goes to the log only: telling a client what an internal name resolves
            # to would make the fetcher a DNS oracle.
            logger.info("image fetch: %s refused, %r resolves to non-public %s", where, target.host, address)
            raise ImageURLRefusedError(
                f"refusing to {where}: the host resolves to a non-public address (loopback, private, "
                f"link-local or reserved); {_PRIVATE_HINT}"
            )
    return addresses


def _resolve(host: str, port: int) -> list[tuple]:
    """`socket.getaddrinfo` for TCP; its own function so that tests can answer for a fake DNS."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _open_connection(family: int, sockaddr: tuple, timeout: float) -> socket.socket:
    """Connect to one checked address; its own function so that tests can see every connection."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _get(target: _Target, addresses: list[tuple[int, tuple]], clock: _Clock) -> http.client.HTTPResponse:
    timeout = clock.remaining()
    if target.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)

    def connect_checked(_address: object, timeout: float, _source: object = None) -> socket.socket:
        # http.client would resolve the name again; connect to an address checked above instead.
        error: OSError = OSError("no address to connect to")
        for family, sockaddr in addresses:
            try:
                return _open_connection(family, sockaddr, timeout)
            except OSError as e:
                error = e
        raise error

    conn._create_connection = connect_checked  # type: ignore[attr-defined]
    try:
        # "Connection: close" hands the socket to the response, so closing it closes everything.
        conn.request("GET", target.path, headers={**_HEADERS, "Connection": "close"})
        return conn.getresponse()
    except (OSError, http.client.HTTPException, ValueError) as e:
        conn.close()
        raise clock.failure(e) from e


def _read_body(response: http.client.HTTPResponse, max_bytes: int, clock: _Clock) -> bytes:
    label = f"URL {clock.url!r}"
    declared = response.getheader("Content-Length") or ""
    if declared.isdigit():
        _check_size(int(declared), max_bytes, label)
    sock = _socket_of(response)
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            # The socket timeout follows the deadline, so a server that drips bytes cannot
            # outlast it; read1 returns whatever one recv brings.
            if sock is not None:
                sock.settimeout(clock.remaining())
            chunk = response.read1(min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            _check_size(total, max_bytes, label)
            clock.remaining()
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise clock.failure(e) from e
    return b"".join(chunks)


def _socket_of(response: http.client.HTTPResponse) -> socket.socket | None:
    raw = getattr(response.fp, "raw", None)
    return getattr(raw, "_sock", None)


# --- errors and limits ---------------------------------------------------------------------


def _describe(error: Exception) -> str:
    # Only what this machine says about the failure: some exceptions carry the bytes the
    # server sent (BadStatusLine holds the line it received), and those stay out of messages.
    if isinstance(error, ssl.SSLError):
        return f"TLS error, {type(error).__name__}"
    if isinstance(error, http.client.HTTPException):
        return f"malformed HTTP response, {type(error).__name__}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def _check_size(n: int, max_bytes: int, label: str) -> None:
    if n > max_bytes:
        raise ImageTooLargeError(
            f"{label} has {n:,} bytes or more, above max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB); "
            "downscale or recompress the image, or raise max_bytes if you trust it"
        )


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase  # the standard phrase, never the server's own text
    except ValueError:
        return ""


def _normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    literal = _ip_or_none(host)
    return str(literal) if literal is not None else host


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
