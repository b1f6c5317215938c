"""Webhook requests to client-given URLs without server-side request forgery (PROTOCOL.md 12.8).

A webhook URL comes from an untrusted client, so before any request leaves: the URL must be https
(http only to this machine, when the operator allows loopback), and every address its host resolves
to must be a public unicast one, never private, loopback, link-local, shared, multicast or a cloud
metadata service. The check runs again on every delivery, and the connection goes to the very
address checked (pinned), with the original host kept for Host, SNI and the certificate check, so a
name that resolves somewhere else later (DNS rebinding) is caught rather than followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}
USER_AGENT = "durable-streams-asgi-webhook"

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# A last label like these makes inet_aton (so getaddrinfo) and browsers read the whole name as an
# IPv4 address: 2130706433, 0x7f000001 and 0177.0.0.1 are all 127.0.0.1.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]{1,5}")
_LOOPBACK4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACK6 = ipaddress.IPv6Address("::1")
# Refused though is_global says yes in some Python versions: shared (carrier-grade NAT) space, IETF
# protocol assignments, the 2024 IPv6 documentation prefix, and 6to4 (deprecated, RFC 7526; not
# global from Python 3.13): one answer on every version.
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in ("100.64.0.0/10", "192.0.0.0/24", "3fff::/20", "2002::/16"))
_GLOBAL_UNICAST6 = ipaddress.IPv6Network("2000::/3")  # the only IPv6 space allocated for the internet
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Metadata services. Most are link-local or unique-local (refused anyway); Azure's wireserver is a
# public address that only means something inside Azure, where it must not be reachable.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "168.63.129.16", "fd00:ec2::254")
)
_MAX_CLIENTS = 32  # per-host HTTP clients kept (see WebhookClient._acquire)


class WebhookURLRejected(ValueError):
    """The URL is not one the server will call; str() is a short message for a 400 response."""


class WebhookDeliveryError(Exception):
    """The webhook could not be delivered (connection, timeout, TLS); str() is a short message."""


@dataclass(frozen=True)
class WebhookTarget:
    url: str  # as given
    scheme: str  # "https" or "http"
    host: str  # lower-cased hostname or IP literal (without brackets)
    port: int
    target: str  # path + query to send in the request line ("/" when empty)


@dataclass(frozen=True)
class WebhookResponse:
    status: int
    body: bytes  # at most max_response_bytes


def _is_loopback(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        return address == _LOOPBACK6 or (address.ipv4_mapped is not None and address.ipv4_mapped in _LOOPBACK4)
    return address in _LOOPBACK4


def address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_loopback: bool) -> bool:
    """Only globally routable unicast addresses, looking through IPv6 forms that carry an IPv4 one;
    loopback (127.0.0.0/8, ::1, ::ffff:127.x.x.x) only when ``allow_loopback``."""
    if _is_loopback(address):
        return allow_loopback
    if address in _METADATA or any(address in network for network in _NOT_GLOBAL):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # the socket connects to the IPv4 address itself
            return address_allowed(address.ipv4_mapped, allow_loopback=allow_loopback)
        if address in _NAT64:  # the gateway reaches the embedded address: its loopback is not ours to allow
            return address_allowed(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), allow_loopback=False)
        # 6to4 is in _NOT_GLOBAL and Teredo (2001::/32) is not global: refused whatever they embed.
        # is_global alone lets through multicast, site-local and (before 3.13) some reserved space.
        return address in _GLOBAL_UNICAST6 and address.is_global and not address.is_multicast
    return address.is_global and not address.is_multicast


def _is_localhost(name: str) -> bool:
    name = name.removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


def _ip(host: str) -> IPAddress | None:
    if "%" in host:  # a zone ID (fe80::1%eth0) names an interface of this machine: never an address here
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_host(host: str, *, allow_loopback: bool) -> IPAddress | None:
    """The address of an IP literal host (checked), or None for a valid host name."""
    address = _ip(host)
    if address is not None:
        if not address_allowed(address, allow_loopback=allow_loopback):
            raise WebhookURLRejected(f"webhook host {host} is not a public address")
        return address
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise WebhookURLRejected("webhook URL host is not a valid host name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise WebhookURLRejected("webhook URL host is not a standard IP address")
    if _is_localhost(host) and not allow_loopback:
        raise WebhookURLRejected("webhook URL host is local")
    return None


def _split_authority(netloc: str) -> tuple[str, str | None]:
    if netloc.startswith("["):
        host, bracket, rest = netloc[1:].partition("]")
        if not bracket or "%" in host:
            raise WebhookURLRejected("webhook URL host is not a valid IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise WebhookURLRejected("webhook URL host is not a valid IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise WebhookURLRejected("webhook URL has a bad port")
        return host, rest[1:] if rest else None
    host, colon, port = netloc.partition(":")
    return host, port if colon else None


def parse_webhook_url(url: str, *, allow_loopback: bool) -> WebhookTarget:
    """Check a webhook URL's syntax (no DNS): an absolute http(s) URL with a host, no userinfo or
    fragment, https unless it is http to a loopback host and ``allow_loopback``; an IP literal host
    is checked with :func:`address_allowed` at once. Raises :class:`WebhookURLRejected`."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLRejected(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    # urlsplit drops tabs and newlines and strips spaces, so what it parses could differ from what was given.
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise WebhookURLRejected("webhook URL has spaces, control or non-ASCII characters")
    if "#" in url:
        raise WebhookURLRejected("webhook URL has a fragment")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise WebhookURLRejected("webhook URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise WebhookURLRejected("webhook URL must be an absolute https URL")
    if "@" in parts.netloc:
        raise WebhookURLRejected("webhook URL has userinfo")
    host, port_text = _split_authority(parts.netloc)
    host = host.lower()
    if not host:
        raise WebhookURLRejected("webhook URL has no host")
    if port_text is None or port_text == "":
        port = DEFAULT_PORTS[scheme]
    elif _PORT.fullmatch(port_text) and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise WebhookURLRejected("webhook URL has a bad port")
    address = _check_host(host, allow_loopback=allow_loopback)
    if scheme == "http":
        local = _is_localhost(host) if address is None else _is_loopback(address)
        if not (allow_loopback and local):
            raise WebhookURLRejected("webhook URL must be https")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(url, scheme, host, port, target)


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


async def _resolve_all(target: WebhookTarget, *, allow_loopback: bool, resolver: Resolver | None) -> list[str]:
    """Every address of the target, in the resolver's order, each allowed (else rejected)."""
    # Again here, not only in parse_webhook_url: a target may be built by hand.
    literal = _check_host(target.host, allow_loopback=allow_loopback)
    if literal is not None:
        found: list[IPAddress] = [literal]
    else:
        try:
            answers = await (resolver or _getaddrinfo)(target.host, target.port)
            found = [ipaddress.ip_address(answer.partition("%")[0]) for answer in answers]
        except (OSError, ValueError):
            raise WebhookURLRejected(f"webhook host {target.host} does not resolve") from None
    if not found:
        raise WebhookURLRejected(f"webhook host {target.host} has no addresses")
    addresses: list[str] = []
    for address in found:
        # Any refused address refuses the name: else a mixed answer could reach the private one.
        if not address_allowed(address, allow_loopback=allow_loopback):
            raise WebhookURLRejected(f"webhook host {target.host} resolves to a non-public address")
        if target.scheme == "http" and not _is_loopback(address):  # plaintext never leaves this machine
            raise WebhookURLRejected("webhook URL must be https")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if str(address) not in addresses:
            addresses.append(str(address))
    return addresses


async def resolve_webhook_target(
    target: WebhookTarget, *, allow_loopback: bool, resolver: Resolver | None = None
) -> str:
    """The one address to connect to for ``target``, if every address its host resolves to is
    allowed (an IP literal resolves to itself). Raises :class:`WebhookURLRejected`."""
    return (await _resolve_all(target, allow_loopback=allow_loopback, resolver=resolver))[0]


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"webhook timed out ({type(exc).__name__})"
    cause: BaseException | None = exc
    for _ in range(8):  # httpx's error wraps httpcore's, which wraps the ssl module's
        if isinstance(cause, ssl.SSLError):
            return f"webhook TLS failed: {getattr(cause, 'verify_message', None) or cause.reason or cause}"
        cause = cause and (cause.__cause__ or cause.__context__)
    return f"webhook {type(exc).__name__}: {str(exc)[:200] or 'failed'}"


class WebhookClient:
    """POSTs webhooks to checked, pinned addresses; never through a proxy, never following a redirect."""

    def __init__(
        self,
        *,
        allow_loopback: bool = False,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        max_response_bytes: int = 64 * 1024,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.allow_loopback = allow_loopback
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.max_response_bytes = max_response_bytes
        self.resolver = resolver
        # One context (the CA bundle loaded once) for every host's client.
        self._ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify, trust_env=False)
        self._clients: OrderedDict[tuple[str, str, int], httpx.AsyncClient] = OrderedDict()
        self._in_use: dict[httpx.AsyncClient, int] = {}
        self._retired: set[httpx.AsyncClient] = set()

    async def _acquire(self, target: WebhookTarget) -> httpx.AsyncClient:
        # A client per host: the pool is keyed by the pinned IP, and a connection whose certificate
        # was checked for one host name must not carry another host's webhook to the same IP.
        key = (target.scheme, target.host, target.port)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                verify=self._ssl,
                follow_redirects=False,
                trust_env=False,  # proxies from the environment must never route webhooks
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                limits=httpx.Limits(max_keepalive_connections=4),
                # Identity: a compressed answer could inflate far past max_response_bytes in one chunk.
                headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
            )
            self._clients[key] = client
            while len(self._clients) > _MAX_CLIENTS:
                self._retired.add(self._clients.popitem(last=False)[1])
        self._clients.move_to_end(key)
        # Counted before any await, so that no other delivery closes this client under it.
        self._in_use[client] = self._in_use.get(client, 0) + 1
        await self._close_idle()
        return client

    async def _release(self, client: httpx.AsyncClient) -> None:
        self._in_use[client] -= 1
        if not self._in_use[client]:
            del self._in_use[client]
        await self._close_idle()

    async def _close_idle(self) -> None:
        for client in [c for c in self._retired if c not in self._in_use]:
            self._retired.discard(client)
            await client.aclose()

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> WebhookResponse:
        """POST ``body`` to ``url``, checked and resolved afresh (DNS rebinding), to the pinned
        address. A 3xx is returned as it is; a body past max_response_bytes is cut there. Raises
        :class:`WebhookURLRejected` or :class:`WebhookDeliveryError`."""
        target = parse_webhook_url(url, allow_loopback=self.allow_loopback)
        try:
            # httpx's timeouts are per operation: a receiver trickling bytes would never trip them.
            return await asyncio.wait_for(self._post(target, body, headers), self.timeout)
        except asyncio.TimeoutError:
            raise WebhookDeliveryError(f"webhook timed out after {self.timeout:g} s") from None

    async def _post(self, target: WebhookTarget, body: bytes, headers: Mapping[str, str]) -> WebhookResponse:
        addresses = await _resolve_all(target, allow_loopback=self.allow_loopback, resolver=self.resolver)
        client = await self._acquire(target)
        try:
            for address in addresses[:-1]:
                try:
                    return await self._send(client, target, address, body, headers)
                except httpx.ConnectError:
                    continue  # nothing was sent: try the next address (localhost as ::1, then 127.0.0.1)
            return await self._send(client, target, addresses[-1], body, headers)
        except (httpx.HTTPError, OSError) as exc:
            raise WebhookDeliveryError(_describe(exc)) from None
        finally:
            await self._release(client)

    async def _send(
        self, client: httpx.AsyncClient, target: WebhookTarget, address: str, body: bytes, headers: Mapping[str, str]
    ) -> WebhookResponse:
        url = httpx.URL(scheme=target.scheme, host=address, port=target.port, raw_path=target.target.encode())
        sent = httpx.Headers(headers)
        for name in ("host", "content-length", "transfer-encoding", "connection"):
            sent.pop(name, None)
        host = f"[{target.host}]" if ":" in target.host else target.host
        sent["host"] = host if target.port == DEFAULT_PORTS[target.scheme] else f"{host}:{target.port}"
        # SNI and the certificate check are for the host name, not the pinned IP.
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and _ip(target.host) is None else {}
        async with client.stream("POST", url, content=body, headers=sent, extensions=extensions) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                chunks.append(chunk[: self.max_response_bytes - size])
                size += len(chunks[-1])
                if size >= self.max_response_bytes:
                    break  # the rest is never read: closing the response drops the connection
            return WebhookResponse(response.status_code, b"".join(chunks))

    async def aclose(self) -> None:
        clients = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        for client in clients:
            await client.aclose()
