"""The webhook client's SSRF defences (durable_streams_asgi.subscriptions.outbound): URL syntax,
address policy, resolution with injected resolvers, and real requests to real local HTTP(S)
servers (pinning, Host and SNI, redirects, body limits, timeouts, DNS rebinding, proxies)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from durable_streams_asgi.subscriptions.outbound import (
    MAX_URL_LENGTH,
    WebhookClient,
    WebhookDeliveryError,
    WebhookTarget,
    WebhookURLRejected,
    address_allowed,
    parse_webhook_url,
    resolve_webhook_target,
)

from .conftest import free_port


class Fixed:
    """A resolver giving each answer in turn (the last one from then on), recording its questions."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


# -- parse_webhook_url --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "target"),
    [
        ("https://example.com/hook", "example.com", 443, "/hook"),
        ("https://Hooks.Example.COM", "hooks.example.com", 443, "/"),
        ("HTTPS://example.com:8443/a/b?x=1&y=2", "example.com", 8443, "/a/b?x=1&y=2"),
        ("https://example.com?x", "example.com", 443, "/?x"),
        ("https://example.com:/p", "example.com", 443, "/p"),
        ("https://my_host.example.com./p", "my_host.example.com.", 443, "/p"),
        ("https://8.8.8.8/hook", "8.8.8.8", 443, "/hook"),
        ("https://[2606:4700:4700::1111]:444/h", "2606:4700:4700::1111", 444, "/h"),
        ("https://0x7f.example.com/", "0x7f.example.com", 443, "/"),
    ],
)
def test_parse_accepts(url: str, host: str, port: int, target: str) -> None:
    parsed = parse_webhook_url(url, allow_loopback=False)
    assert parsed == WebhookTarget(url, "https", host, port, target)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "example.com/hook",
        "//example.com/hook",
        "https:/hook",
        "https:///hook",
        "https://:443/hook",
        "https://user:pass@example.com/hook",
        "https://user@example.com/hook",
        "https://example.com/hook#frag",
        "https://example.com/hook#",
        "https://example.com:0/",
        "https://example.com:65536/",
        "https://example.com:https/",
        "https://example.com:+443/",
        "https://example.com:443:443/",
        "https://[2606:4700:4700::1111]x/",
        "https://[2606:4700:4700::1111/",
        "https://[8.8.8.8]/",
        "https://[fe80::1%25eth0]/",
        "http://example.com/hook",
        "http://8.8.8.8/hook",
        "http://localhost/hook",
        "http://127.0.0.1:9/x",
        "https://localhost/hook",
        "https://a.localhost/hook",
        "https://10.0.0.1/hook",
        "https://192.168.1.1/",
        "https://172.16.0.1/",
        "https://127.0.0.1/",
        "https://[::1]/",
        "https://[fe80::1]/",
        "https://[fc00::1]/",
        "https://[::ffff:10.0.0.1]/",
        "https://[::ffff:127.0.0.1]/",
        "https://[64:ff9b::a00:1]/",
        "https://169.254.169.254/latest/meta-data",
        "https://[fd00:ec2::254]/latest/meta-data",
        "https://0.0.0.0/",
        "https://[::]/",
        "https://100.64.0.1/",
        "https://224.0.0.1/",
        "https://2130706433/",
        "https://0x7f000001/",
        "https://0177.0.0.1/",
        "https://127.1/",
        "https://8.8.8.8./",
        "https://exa mple.com/",
        "https://example.com/a b",
        "https://example.com/\t",
        " https://example.com/",
        "https://exämple.com/",
        "https://-example.com/",
        "https://example..com/",
        "https://example.com\\@10.0.0.1/",
        "https://" + "a" * 64 + ".com/",
        "https://example.com/" + "a" * MAX_URL_LENGTH,
    ],
)
def test_parse_refuses(url: str) -> None:
    with pytest.raises(WebhookURLRejected) as caught:
        parse_webhook_url(url, allow_loopback=False)
    assert str(caught.value) and len(str(caught.value)) < 120


@pytest.mark.parametrize(
    ("url", "host", "scheme", "port"),
    [
        ("http://127.0.0.1:9/x", "127.0.0.1", "http", 9),
        ("http://127.5.6.7:9/x", "127.5.6.7", "http", 9),
        ("http://localhost:9/", "localhost", "http", 9),
        ("http://hooks.localhost/", "hooks.localhost", "http", 80),
        ("http://[::1]:9/", "::1", "http", 9),
        ("https://127.0.0.1:9/", "127.0.0.1", "https", 9),
        ("https://localhost/", "localhost", "https", 443),
    ],
)
def test_parse_with_loopback_allowed(url: str, host: str, scheme: str, port: int) -> None:
    parsed = parse_webhook_url(url, allow_loopback=True)
    assert (parsed.host, parsed.scheme, parsed.port) == (host, scheme, port)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/",  # http stays loopback-only
        "http://10.0.0.1/",
        "https://10.0.0.1/",
        "https://169.254.169.254/",
        "https://0.0.0.0/",  # connecting to 0.0.0.0 reaches this machine, but it is not opted in
        "https://2130706433/",
        "https://0x7f000001/",
        "https://0177.0.0.1/",
    ],
)
def test_parse_refuses_with_loopback_allowed(url: str) -> None:
    with pytest.raises(WebhookURLRejected):
        parse_webhook_url(url, allow_loopback=True)


# -- address_allowed -----------------------------------------------------------------------------

ADDRESSES = [
    # address, allowed without loopback, allowed with loopback
    ("8.8.8.8", True, True),
    ("1.1.1.1", True, True),
    ("2606:4700:4700::1111", True, True),
    ("2001:4860:4860::8888", True, True),
    ("::ffff:8.8.8.8", True, True),
    ("64:ff9b::808:808", True, True),
    ("127.0.0.1", False, True),
    ("127.255.0.9", False, True),
    ("::1", False, True),
    ("::ffff:127.0.0.1", False, True),
    ("0.0.0.0", False, False),
    ("0.1.2.3", False, False),
    ("::", False, False),
    ("10.0.0.1", False, False),
    ("172.16.0.1", False, False),
    ("192.168.0.1", False, False),
    ("100.64.0.1", False, False),
    ("100.100.100.200", False, False),
    ("169.254.169.254", False, False),
    ("169.254.1.1", False, False),
    ("168.63.129.16", False, False),
    ("192.0.0.8", False, False),
    ("192.0.2.1", False, False),
    ("198.18.0.1", False, False),
    ("224.0.0.1", False, False),
    ("239.255.255.250", False, False),
    ("240.0.0.1", False, False),
    ("255.255.255.255", False, False),
    ("fe80::1", False, False),
    ("fec0::1", False, False),
    ("fc00::1", False, False),
    ("fd00:ec2::254", False, False),
    ("ff02::1", False, False),
    ("ff0e::1", False, False),
    ("2001:db8::1", False, False),
    ("::ffff:10.0.0.1", False, False),
    ("::ffff:169.254.169.254", False, False),
    ("::10.0.0.1", False, False),
    ("::127.0.0.1", False, False),
    ("64:ff9b::a00:1", False, False),
    ("64:ff9b::7f00:1", False, False),  # NAT64 to loopback is the gateway's loopback, never ours
    ("64:ff9b::a9fe:a9fe", False, False),
    ("64:ff9b:1::808:808", False, False),
    ("2002:808:808::1", False, False),  # 6to4 (deprecated) is refused even to a public address
    ("2002:a00:1::1", False, False),
    ("2002:7f00:1::1", False, False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False, False),  # Teredo
    ("100::1", False, False),
    ("3fff::1", False, False),
]


@pytest.mark.parametrize(("address", "public", "with_loopback"), ADDRESSES)
def test_address_allowed(address: str, public: bool, with_loopback: bool) -> None:
    parsed = ipaddress.ip_address(address)
    assert address_allowed(parsed, allow_loopback=False) is public
    assert address_allowed(parsed, allow_loopback=True) is with_loopback


# -- resolve_webhook_target ----------------------------------------------------------------------


def target(url: str) -> WebhookTarget:
    return parse_webhook_url(url, allow_loopback=True)


async def test_resolve_public_name() -> None:
    resolver = Fixed(["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
    address = await resolve_webhook_target(target("https://example.com:8443/"), allow_loopback=False, resolver=resolver)
    assert address == "93.184.215.14"
    assert resolver.asked == [("example.com", 8443)]


@pytest.mark.parametrize(
    "answer",
    [["10.0.0.5"], ["93.184.215.14", "10.0.0.5"], ["10.0.0.5", "93.184.215.14"], ["169.254.169.254"], ["::1"], []],
)
async def test_resolve_refuses(answer: list[str]) -> None:
    with pytest.raises(WebhookURLRejected):
        await resolve_webhook_target(target("https://example.com/"), allow_loopback=False, resolver=Fixed(answer))


async def test_resolve_refuses_a_broken_resolver() -> None:
    async def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for resolver in (failing, Fixed(["not an address"])):
        with pytest.raises(WebhookURLRejected):
            await resolve_webhook_target(target("https://example.com/"), allow_loopback=False, resolver=resolver)


async def test_resolve_ip_literal_without_dns() -> None:
    resolver = Fixed(["10.0.0.1"])
    assert (
        await resolve_webhook_target(target("https://8.8.8.8/"), allow_loopback=False, resolver=resolver) == "8.8.8.8"
    )
    assert await resolve_webhook_target(target("http://[::1]:9/"), allow_loopback=True, resolver=resolver) == "::1"
    assert resolver.asked == []


async def test_resolve_http_only_to_loopback() -> None:
    """http://*.localhost is accepted on its name; if DNS sends it anywhere else, it is refused."""
    hook = target("http://hooks.localhost:9/")
    assert await resolve_webhook_target(hook, allow_loopback=True, resolver=Fixed(["127.0.0.1"])) == "127.0.0.1"
    with pytest.raises(WebhookURLRejected):
        await resolve_webhook_target(hook, allow_loopback=True, resolver=Fixed(["8.8.8.8"]))


async def test_resolve_mapped_answer_connects_over_ipv4() -> None:
    resolver = Fixed(["::ffff:8.8.8.8"])
    assert (
        await resolve_webhook_target(target("https://x.example/"), allow_loopback=False, resolver=resolver) == "8.8.8.8"
    )


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0"])
async def test_resolve_refuses_non_standard_ipv4(host: str) -> None:
    """The system resolver reads these as IPv4 addresses (inet_aton): they are refused before any
    resolver is asked, loopback allowed or not, even in a target built by hand."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    assert ipaddress.ip_address(infos[0][4][0]).is_private  # what getaddrinfo would have connected to
    hand_made = WebhookTarget(f"https://{host}/", "https", host, 443, "/")
    resolver = Fixed(["8.8.8.8"])
    for allow_loopback in (False, True):
        with pytest.raises(WebhookURLRejected):
            parse_webhook_url(hand_made.url, allow_loopback=allow_loopback)
        for use in (None, resolver):
            with pytest.raises(WebhookURLRejected):
                await resolve_webhook_target(hand_made, allow_loopback=allow_loopback, resolver=use)
    assert resolver.asked == []


async def test_default_resolver_localhost() -> None:
    hook = target("http://localhost:9/")
    assert ipaddress.ip_address(await resolve_webhook_target(hook, allow_loopback=True)).is_loopback
    with pytest.raises(WebhookURLRejected):
        await resolve_webhook_target(hook, allow_loopback=False)


# -- real servers --------------------------------------------------------------------------------


@dataclass
class Seen:
    head: list[str]
    headers: dict[str, str]
    body: bytes
    sni: str | None


@dataclass
class Server:
    """A real HTTP(S) server on 127.0.0.1 recording every connection and request. ``reply`` is the
    raw answer; ``hang`` reads the request and never answers."""

    reply: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    hang: bool = False
    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _sni: list[str | None] = field(default_factory=list)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Server:
        if self.tls is not None:
            self.tls.sni_callback = lambda sock, name, ctx: self._sni.append(name)  # type: ignore[assignment,misc]
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        sni = self._sni[-1] if self._sni else None
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Seen(head, headers, body, sni))
                if self.hang:
                    await self._release.wait()
                    return
                writer.write(self.reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


StartServer = Callable[..., Awaitable[Server]]
MakeClient = Callable[..., WebhookClient]
Certificate = tuple[Path, Path]


@pytest.fixture
async def servers() -> AsyncIterator[StartServer]:
    started: list[Server] = []

    async def start(**options: object) -> Server:
        server = await Server(**options).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


@pytest.fixture
async def clients() -> AsyncIterator[MakeClient]:
    made: list[WebhookClient] = []

    def make(**options: object) -> WebhookClient:
        client = WebhookClient(**options)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


SIGNED = {"content-type": "application/json", "webhook-signature": "t=1,kid=k,ed25519=abc", "x-custom": "yes"}


async def test_post_pins_the_address_and_keeps_the_host(servers: StartServer, clients: MakeClient) -> None:
    server = await servers()
    resolver = Fixed(["127.0.0.1"])
    client = clients(allow_loopback=True, resolver=resolver)
    body = b'{"subscription_id":"s","wake_id":"w"}\x00\xff'
    # The caller's own Host and framing headers never reach the wire: the client sets them.
    headers = {**SIGNED, "Host": "evil.example", "Content-Length": "1"}
    response = await client.post(f"http://localhost:{server.port}/hook?x=1", body, headers)
    assert (response.status, response.body) == (200, b"{}")
    [seen] = server.requests
    assert seen.head[0] == "POST /hook?x=1 HTTP/1.1"
    assert seen.body == body
    assert seen.headers["host"] == f"localhost:{server.port}"
    assert seen.headers["content-length"] == str(len(body))
    assert {k: seen.headers[k] for k in SIGNED} == SIGNED
    assert resolver.asked == [("localhost", server.port)]


async def test_post_to_ipv4_and_localhost_with_the_system_resolver(servers: StartServer, clients: MakeClient) -> None:
    server = await servers()
    client = clients(allow_loopback=True)
    assert (await client.post(f"http://127.0.0.1:{server.port}/", b"a", {})).status == 200
    # Wherever localhost resolves first (::1 on many systems), it ends up at the IPv4 listener.
    assert (await client.post(f"http://localhost:{server.port}/", b"b", {})).status == 200
    assert [seen.body for seen in server.requests] == [b"a", b"b"]
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"


async def test_post_falls_back_to_the_next_address(servers: StartServer, clients: MakeClient) -> None:
    """Nothing listens on 127.0.0.2 (the server has 127.0.0.1 only): refused, so the next address is tried."""
    server = await servers()
    client = clients(allow_loopback=True, resolver=Fixed(["127.0.0.2", "127.0.0.1"]))
    assert (await client.post(f"http://localhost:{server.port}/", b"{}", {})).status == 200
    assert len(server.requests) == 1


async def test_many_hosts_keep_a_bounded_set_of_clients(servers: StartServer, clients: MakeClient) -> None:
    server = await servers()
    client = clients(allow_loopback=True, resolver=Fixed(["127.0.0.1"]))
    hosts = [f"h{i}.localhost" for i in range(40)] + ["h0.localhost"]
    for host in hosts:
        assert (await client.post(f"http://{host}:{server.port}/", b"{}", {})).status == 200
    assert [seen.headers["host"] for seen in server.requests] == [f"{host}:{server.port}" for host in hosts]
    assert len(client._clients) == 32 and not client._retired  # the oldest were closed


async def test_redirect_is_not_followed(servers: StartServer, clients: MakeClient) -> None:
    second = await servers()
    location = f"http://127.0.0.1:{second.port}/elsewhere"
    first = await servers(reply=f"HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n".encode())
    client = clients(allow_loopback=True)
    response = await client.post(f"http://127.0.0.1:{first.port}/hook", b"{}", SIGNED)
    assert response.status == 302
    assert len(first.requests) == 1
    assert second.connections == 0 and second.requests == []


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_big_response_is_cut(servers: StartServer, clients: MakeClient, framing: str) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    if framing == "length":
        reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big
    elif framing == "chunked":
        reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"
    else:
        reply = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + big
    server = await servers(reply=reply)
    client = clients(allow_loopback=True, max_response_bytes=1000)
    response = await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {})
    assert (response.status, response.body) == (200, big[:1000])
    # The connection with the unread rest was dropped: the next post works on a fresh one.
    assert (await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {})).body == big[:1000]


async def test_small_response_is_whole(servers: StartServer, clients: MakeClient) -> None:
    server = await servers(reply=b'HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{"done":true}')
    client = clients(allow_loopback=True, max_response_bytes=13)
    assert (await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {})).body == b'{"done":true}'


async def test_silent_server_times_out(servers: StartServer, clients: MakeClient) -> None:
    server = await servers(hang=True)
    client = clients(allow_loopback=True, timeout=0.5, connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(WebhookDeliveryError) as caught:
        await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {})
    assert time.monotonic() - started < 3
    assert "timed out" in str(caught.value)
    assert len(server.requests) == 1


async def test_trickling_server_is_bounded_by_the_whole_timeout(clients: MakeClient) -> None:
    """httpx's read timeout is per read: a byte every 0.2 s never trips it, the overall limit does."""
    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        while not stop.is_set():
            writer.write(b"x")
            await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = clients(allow_loopback=True, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(WebhookDeliveryError):
            await client.post(f"http://127.0.0.1:{port}/", b"{}", {})
        assert 0.9 < time.monotonic() - started < 3
    finally:
        stop.set()
        server.close()
        await server.wait_closed()


async def test_refused_port(clients: MakeClient) -> None:
    client = clients(allow_loopback=True, connect_timeout=0.5, timeout=0.5)
    with pytest.raises(WebhookDeliveryError) as caught:
        await client.post(f"http://127.0.0.1:{free_port()}/", b"{}", {})
    assert "ConnectError" in str(caught.value)


async def test_dns_rebinding_is_checked_on_every_post(servers: StartServer, clients: MakeClient) -> None:
    server = await servers()
    client = clients(allow_loopback=True, resolver=Fixed(["127.0.0.1"], ["10.0.0.1"]))
    url = f"http://localhost:{server.port}/hook"
    assert (await client.post(url, b"1", {})).status == 200
    with pytest.raises(WebhookURLRejected):
        await client.post(url, b"2", {})
    assert [seen.body for seen in server.requests] == [b"1"]
    assert server.connections == 1


async def test_loopback_refused_unless_allowed(servers: StartServer, clients: MakeClient) -> None:
    server = await servers()
    client = clients()
    for url in (f"http://127.0.0.1:{server.port}/", f"https://127.0.0.1:{server.port}/"):
        with pytest.raises(WebhookURLRejected):
            await client.post(url, b"{}", {})
    rebinding = clients(resolver=Fixed(["127.0.0.1"]))
    with pytest.raises(WebhookURLRejected):
        await rebinding.post(f"https://hooks.example:{server.port}/", b"{}", {})
    assert server.connections == 0


async def test_environment_proxies_are_ignored(
    servers: StartServer, clients: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await servers()
    server = await servers()
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = clients(allow_loopback=True)
    assert (await client.post(f"http://127.0.0.1:{server.port}/", b"{}", {})).status == 200
    assert (await client.post(f"http://localhost:{server.port}/", b"{}", {})).status == 200
    assert len(server.requests) == 2
    assert proxy.connections == 0


# -- TLS: the pinned connection still checks the certificate against the host name ---------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for hooks.example and alt.example (not other.example)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.example"), x509.DNSName("alt.example")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
async def tls_server(servers: StartServer, certificate: Certificate) -> Server:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return await servers(tls=context)


def trusting(certificate: Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


async def test_https_pins_with_sni_and_certificate_check(
    tls_server: Server, clients: MakeClient, certificate: Certificate
) -> None:
    resolver = Fixed(["127.0.0.1"])
    client = clients(allow_loopback=True, resolver=resolver, verify=trusting(certificate))
    response = await client.post(f"https://hooks.example:{tls_server.port}/hook", b"{}", SIGNED)
    assert response.status == 200
    [seen] = tls_server.requests
    assert seen.sni == "hooks.example"
    assert seen.headers["host"] == f"hooks.example:{tls_server.port}"


async def test_https_wrong_certificate_is_a_delivery_error(
    tls_server: Server, clients: MakeClient, certificate: Certificate
) -> None:
    client = clients(allow_loopback=True, resolver=Fixed(["127.0.0.1"]), verify=trusting(certificate))
    with pytest.raises(WebhookDeliveryError) as caught:
        await client.post(f"https://other.example:{tls_server.port}/hook", b"{}", {})
    assert "TLS" in str(caught.value)
    untrusting = clients(allow_loopback=True, resolver=Fixed(["127.0.0.1"]))  # the system CAs only
    with pytest.raises(WebhookDeliveryError):
        await untrusting.post(f"https://hooks.example:{tls_server.port}/hook", b"{}", {})
    assert tls_server.requests == []


async def test_https_connection_not_shared_between_host_names(
    tls_server: Server, clients: MakeClient, certificate: Certificate
) -> None:
    """Two names on one IP: each gets its own TLS connection, checked for its own name."""
    client = clients(allow_loopback=True, resolver=Fixed(["127.0.0.1"]), verify=trusting(certificate))
    for host in ("hooks.example", "alt.example", "hooks.example", "alt.example"):
        assert (await client.post(f"https://{host}:{tls_server.port}/", b"{}", {})).status == 200
    assert [(seen.sni, seen.headers["host"].partition(":")[0]) for seen in tls_server.requests] == [
        ("hooks.example", "hooks.example"),
        ("alt.example", "alt.example"),
    ] * 2
    assert tls_server.connections == 2  # and each name's connection was reused
