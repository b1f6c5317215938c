"""The built-in authorize hooks (durable_streams_asgi.auth), through real HTTP requests.

JWKS cases serve a real JWKS document from a real local HTTP server (keys made by
``cryptography``) and count its hits; the hooks' clocks are fake so that expiry, the JWKS cache and
the refetch rate limit are driven without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.requests import Request

from durable_streams_asgi import AccessDenied, MemoryStorage, durable_streams_app
from durable_streams_asgi.auth import JWTAuth, PathGlob, TokenAuth, any_of, glob_match
from durable_streams_asgi.options import Authorize
from durable_streams_asgi.storage.base import StreamConfig, StreamNotFound

from .conftest import free_port

NOW = 1_700_000_000.0
SECRET = "a-test-secret-of-at-least-32-bytes!!"
TEXT = {"Content-Type": "text/plain"}
CHALLENGE = 'Bearer realm="durable-streams"'


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A JWT made by hand (PyJWT will not make these): ``sign(signing_input) -> signature``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"


def hs(ds: object = None, secret: str = SECRET, **claims: Any) -> str:
    """An HS256 token valid for an hour from NOW; ``ds`` its permissions, claims set to None left out."""
    payload = {"exp": NOW + 3600, "ds": ds, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


@contextlib.asynccontextmanager
async def serve(hook: Authorize, *streams: str) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryStorage]]:
    """A client of durable_streams_app(authorize=hook), with ``streams`` created beforehand."""
    storage = MemoryStorage()
    for path in streams:
        await storage.create(path, StreamConfig(content_type="text/plain"), [b"hello"])
    app = durable_streams_app(storage, authorize=hook)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        yield client, storage


async def attempt(client: httpx.AsyncClient, action: str, path: str, headers: dict[str, str]) -> httpx.Response:
    """One request that the server authorizes as ``action`` on ``path``."""
    if action == "read":
        return await client.get(path, params={"offset": "-1"}, headers=headers)
    if action == "create":
        return await client.put(path, headers={**headers, **TEXT})
    if action == "append":
        return await client.post(path, headers={**headers, **TEXT}, content=b"more")
    if action == "close":
        return await client.post(path, headers={**headers, "Stream-Closed": "true"})
    assert action == "delete"
    return await client.delete(path, headers=headers)


# The statuses of a successful create, append, read, close and delete, run in that order on one path.
LIFECYCLE = [("create", 201), ("append", 204), ("read", 200), ("close", 204), ("delete", 204)]


# -- path globs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/chats/42", "/chats/42", True),
        ("/chats/42", "/chats/421", False),
        ("/chats/*", "/chats/42", True),
        ("/chats/*", "/chats/42/history", False),  # * never crosses a /
        ("/chats/*", "/chats", False),
        ("/chats/**", "/chats/42/history", True),
        ("/chats/**", "/chats", True),  # ** is zero segments too
        ("/chats/**", "/chatsX", False),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c/zz", False),
        ("/a/**/**/z", "/a/b/z", True),
        ("/users/7/chat-*", "/users/7/chat-1", True),
        ("/users/7/chat-*", "/users/7/other", False),
        ("/*/log", "/x/log", True),
        ("/**", "/any/thing/at/all", True),
        ("/a.b", "/aXb", False),  # regex characters are literal
        ("/a?", "/ab", False),
        ("/a?", "/a?", True),
    ],
)
def test_glob_match(pattern: str, path: str, matches: bool) -> None:
    assert glob_match(pattern, path) is matches
    assert PathGlob(pattern).match(path) is matches


@pytest.mark.parametrize("pattern", ["chats/*", "", "/a**", "/**b/c", "/a//b", "/a/"])
def test_invalid_globs_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        PathGlob(pattern)


# -- static tokens ----------------------------------------------------------------------------------


async def test_a_write_token_may_do_everything() -> None:
    async with serve(TokenAuth(read_tokens=["r-token"], write_tokens=["w-token", "w2"])) as (client, _):
        for action, status in LIFECYCLE:
            assert (await attempt(client, action, "/s", bearer("w2"))).status_code == status, action


async def test_a_read_token_reads_and_may_not_write() -> None:
    async with serve(TokenAuth(read_tokens=["r-token"], write_tokens=["w-token"]), "/s") as (client, storage):
        assert (await attempt(client, "read", "/s", bearer("r-token"))).text == "hello"
        for action in ("create", "append", "close", "delete"):
            r = await attempt(client, action, "/s", bearer("r-token"))
            assert r.status_code == 403 and r.text == "this token may only read", action
            assert r.headers["www-authenticate"] == f'{CHALLENGE}, error="insufficient_scope"'
        info = await storage.head("/s")
        assert info.tail == 5 and not info.closed  # nothing was written


@pytest.mark.parametrize(
    "authorization", [None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer ", "Bearer two words", "w-token"]
)
async def test_missing_or_malformed_credentials_get_401(authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with serve(TokenAuth(write_tokens=["w-token"]), "/s") as (client, _):
        r = await attempt(client, "read", "/s", headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == CHALLENGE
    assert "Bearer" in r.text


async def test_an_unknown_token_gets_401_invalid_token() -> None:
    async with serve(TokenAuth(write_tokens=["w-token"]), "/s") as (client, _):
        for token in ("w-tokenX", "w-toke", "W-TOKEN"):
            r = await attempt(client, "read", "/s", bearer(token))
            assert r.status_code == 401 and r.text == "unknown token"
            assert r.headers["www-authenticate"] == f'{CHALLENGE}, error="invalid_token"'
        # The scheme is case-insensitive (RFC 7235); the token is not.
        assert (await attempt(client, "read", "/s", {"Authorization": "bearer w-token"})).status_code == 200


def test_tokens_are_compared_in_constant_time_with_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    auth = TokenAuth(read_tokens=["r1", "r2"], write_tokens=["w1", "w2", "w3"])
    request = Request({"type": "http", "headers": [(b"authorization", b"Bearer w1")]})
    assert auth(request, "append", "/s") is True
    # A match on the first token still compares with all five, and only fixed-length digests.
    assert len(compared) == 5 and {len(a) for pair in compared for a in pair} == {32}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, ValueError),
        ({"write_tokens": [""]}, ValueError),
        ({"read_tokens": ["ok", ""]}, ValueError),
        ({"write_tokens": ["has space"]}, ValueError),
        ({"write_tokens": "one-string"}, TypeError),
    ],
)
def test_token_auth_refuses_bad_configuration(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        TokenAuth(**kwargs)


# -- JWTs with a secret -----------------------------------------------------------------------------


async def test_jwt_grants_by_action_and_path() -> None:
    token = hs({"read": ["/chats/**"], "write": ["/chats/42", "/users/7/*"]})
    async with serve(JWTAuth(SECRET, clock=Clock()), "/chats/1/history", "/other") as (client, _):
        for path, lifecycle in (("/chats/42", LIFECYCLE), ("/users/7/a", [s for s in LIFECYCLE if s[0] != "read"])):
            for action, status in lifecycle:
                assert (await attempt(client, action, path, bearer(token))).status_code == status, (action, path)
        assert (await attempt(client, "read", "/chats/1/history", bearer(token))).status_code == 200  # **
        refused = [
            ("create", "/chats/43"),  # only read below /chats
            ("append", "/chats/1/history"),
            ("create", "/users/7/a/b"),  # * is one segment
            ("read", "/users/7/a"),  # write does not include read
            ("read", "/other"),
        ]
        for action, path in refused:
            r = await attempt(client, action, path, bearer(token))
            assert r.status_code == 403 and r.text == f"the token does not allow {action} on this stream"


async def test_jwt_single_actions_grant_only_themselves() -> None:
    token = hs({"append": ["/log"], "launch": {"any": "shape"}, "read": ["/log"]})  # unknown actions: ignored
    async with serve(JWTAuth(SECRET, clock=Clock()), "/log") as (client, _):
        assert (await attempt(client, "append", "/log", bearer(token))).status_code == 204
        assert (await attempt(client, "read", "/log", bearer(token))).text == "hellomore"
        for action in ("create", "close", "delete"):
            assert (await attempt(client, action, "/log", bearer(token))).status_code == 403, action


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        (None, "the token has no 'ds' claim, so it grants no access"),
        (["/chats/**"], "the token's 'ds' claim is malformed, so it grants no access"),
        ({"read": "/chats/**"}, "the token's 'ds' claim is malformed, so it grants no access"),
        ({"read": [42]}, "the token's 'ds' claim is malformed, so it grants no access"),
        ({"read": ["chats/**"]}, "the token's 'ds' claim is malformed, so it grants no access"),
        ({"read": ["/ok"], "write": ["/a**"]}, "the token's 'ds' claim is malformed, so it grants no access"),
    ],
)
async def test_a_jwt_without_a_valid_claim_grants_nothing(ds: object, message: str) -> None:
    async with serve(JWTAuth(SECRET, clock=Clock()), "/ok") as (client, _):
        r = await attempt(client, "read", "/ok", bearer(hs(ds)))
    assert r.status_code == 403 and r.text == message


async def test_the_claim_name_is_configurable() -> None:
    auth = JWTAuth(SECRET, claim="perm", clock=Clock())
    async with serve(auth, "/s") as (client, _):
        assert (await attempt(client, "read", "/s", bearer(hs(perm={"read": ["/s"]})))).status_code == 200
        assert (await attempt(client, "read", "/s", bearer(hs({"read": ["/s"]})))).status_code == 403


async def test_expiry_is_checked_with_leeway_and_on_every_use_of_a_cached_token() -> None:
    clock = Clock()
    grants = {"read": ["/s"]}
    async with serve(JWTAuth(SECRET, clock=clock), "/s") as (client, _):
        r = await attempt(client, "read", "/s", bearer(hs(grants, exp=NOW - 31)))
        assert r.status_code == 401 and r.text == "token expired"
        expected = f'{CHALLENGE}, error="invalid_token", error_description="token expired"'
        assert r.headers["www-authenticate"] == expected
        assert (await attempt(client, "read", "/s", bearer(hs(grants, exp=NOW - 10)))).status_code == 200  # leeway
        token = hs(grants, exp=NOW + 60)
        assert (await attempt(client, "read", "/s", bearer(token))).status_code == 200
        clock.advance(89)
        assert (await attempt(client, "read", "/s", bearer(token))).status_code == 200
        clock.advance(1)  # 60 s + 30 s leeway: the cached verification does not outlive the token
        assert (await attempt(client, "read", "/s", bearer(token))).text == "token expired"


async def test_a_token_not_yet_valid_is_refused_until_it_is() -> None:
    clock = Clock()
    token = hs({"read": ["/s"]}, nbf=NOW + 100)
    async with serve(JWTAuth(SECRET, clock=clock), "/s") as (client, _):
        r = await attempt(client, "read", "/s", bearer(token))
        assert r.status_code == 401 and r.text == "token not yet valid"
        clock.advance(70)  # within the 30 s leeway of nbf
        assert (await attempt(client, "read", "/s", bearer(token))).status_code == 200


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": None}, "token has no 'exp' claim"),
        ({"exp": "tomorrow"}, "malformed token"),
        ({"exp": 10**400}, "malformed token"),
        ({"exp": True}, "malformed token"),
        ({"nbf": "now"}, "malformed token"),
        ({"aud": "another"}, "token audience not accepted"),
        ({"aud": None}, "token has no 'aud' claim"),
        ({"iss": "https://elsewhere"}, "token issuer not accepted"),
        ({"iss": None}, "token has no 'iss' claim"),
    ],
)
async def test_claims_that_are_missing_or_not_ours_get_401(claims: dict[str, Any], message: str) -> None:
    auth = JWTAuth(SECRET, audience="streams", issuer="https://issuer", clock=Clock())
    ours = {"aud": "streams", "iss": "https://issuer"}
    async with serve(auth, "/s") as (client, _):
        assert (await attempt(client, "read", "/s", bearer(hs({"read": ["/s"]}, **ours)))).status_code == 200
        r = await attempt(client, "read", "/s", bearer(hs({"read": ["/s"]}, **{**ours, **claims})))
    assert r.status_code == 401 and r.text == message
    assert f'error_description="{message}"' in r.headers["www-authenticate"]


async def test_an_audience_is_refused_when_none_is_configured() -> None:
    async with serve(JWTAuth(SECRET, clock=Clock()), "/s") as (client, _):
        r = await attempt(client, "read", "/s", bearer(hs({"read": ["/s"]}, aud="someone")))
    assert r.status_code == 401 and r.text == "token audience not accepted"


async def test_bad_signatures_and_forgeries_get_401() -> None:
    grants = {"write": ["/**"]}
    good = hs(grants)
    header, _, signature = good.split(".")
    escalated = f"{header}.{b64(json.dumps({'exp': NOW + 3600, 'ds': {'write': ['/**']}, 'x': 1}).encode())}"
    cases = {
        hs(grants, secret="another-secret-that-is-also-long-enough"): "invalid token signature",
        f"{escalated}.{signature}": "invalid token signature",
        forged({"alg": "none", "typ": "JWT"}, {"exp": NOW + 3600, "ds": grants}): "token algorithm not accepted",
        "not.a.jwt": "malformed token",
        "opaque-token": "malformed token",
    }
    async with serve(JWTAuth(SECRET, clock=Clock())) as (client, _):
        assert (await attempt(client, "create", "/s", bearer(good))).status_code == 201
        for token, message in cases.items():
            r = await attempt(client, "append", "/s", bearer(token))
            assert (r.status_code, r.text) == (401, message), token
            assert 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_a_fork_needs_read_on_its_source() -> None:
    token = hs({"create": ["/forks/*"], "read": ["/public/**"]})
    async with serve(JWTAuth(SECRET, clock=Clock()), "/public/a", "/private/b") as (client, storage):
        fork = {**bearer(token), "Stream-Forked-From": "/public/a"}
        assert (await client.put("/forks/1", headers=fork)).status_code == 201
        assert (await storage.read("/forks/1", 0, 1 << 20)).items == [b"hello"]
        r = await client.put("/forks/2", headers={**fork, "Stream-Forked-From": "/private/b"})
        assert r.status_code == 403 and r.text == "the token does not allow read on this stream"
        with pytest.raises(StreamNotFound):
            await storage.head("/forks/2")


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((SECRET, "https://issuer/jwks.json"), {}),
        (("too-short",), {}),
        ((SECRET,), {"algorithms": ["RS256"]}),
        ((SECRET,), {"algorithms": ["none"]}),
        ((SECRET,), {"algorithms": []}),
        ((None, "https://issuer/jwks.json"), {"algorithms": ["HS256"]}),
        ((None, "https://issuer/jwks.json"), {"algorithms": ["RS256", "none"]}),
        ((None, "file:///etc/jwks.json"), {}),
    ],
)
def test_jwt_auth_refuses_bad_configuration(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        JWTAuth(*args, **kwargs)


def test_the_module_imports_without_pyjwt_and_jwt_auth_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['jwt'] = None\n"
        "from durable_streams_asgi.auth import JWTAuth, TokenAuth, any_of, glob_match\n"
        "assert glob_match('/a/**', '/a/b') and TokenAuth(write_tokens=['t'])\n"
        "try:\n    JWTAuth(secret='x' * 32)\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'durable-streams-asgi[auth]'" in result.stdout


# -- JWTs with a JWKS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "r1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "r2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "e1": ec.generate_private_key(ec.SECP256R1()),
        "d1": ed25519.Ed25519PrivateKey.generate(),
    }


def public_jwk(kid: str, private: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def signed(private: Any, alg: str, kid: str | None, ds: object, **claims: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode({"exp": NOW + 3600, "ds": ds, **claims}, private, algorithm=alg, headers=headers)


class JWKSServer:
    """A real HTTP server with a JWKS document at ``url``: counts hits, can fail or hold answers."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hold: threading.Event | None = None  # when set: each answer waits for it
        self.hits = 0
        self._changed = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._changed:
                    owner.hits += 1
                    owner._changed.notify_all()
                if owner.hold is not None:
                    owner.hold.wait(30)
                body = json.dumps(owner.document).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def wait_for_hits(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.hits >= count, timeout=10), self.hits

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def jwks(keys: dict[str, Any]) -> Iterator[JWKSServer]:
    server = JWKSServer()
    server.document = {"keys": [public_jwk(kid, keys[kid]) for kid in ("r1", "e1", "d1")]}
    yield server
    server.close()


ALL = {"write": ["/**"], "read": ["/**"]}


async def test_jwks_tokens_of_each_key_type_are_verified_with_one_fetch(jwks: JWKSServer, keys: dict[str, Any]) -> None:
    auth = JWTAuth(jwks_url=jwks.url, clock=Clock())
    tokens = {
        "/rs": signed(keys["r1"], "RS256", "r1", ALL),
        "/ps": signed(keys["r1"], "PS256", "r1", ALL),  # the JWK has no alg: any RSA algorithm fits
        "/es": signed(keys["e1"], "ES256", "e1", ALL),
        "/ed": signed(keys["d1"], "EdDSA", "d1", ALL),
        "/nokid": signed(keys["d1"], "EdDSA", None, ALL),
    }
    async with serve(auth) as (client, _):
        for path, token in tokens.items():
            for action, status in LIFECYCLE:
                assert (await attempt(client, action, path, bearer(token))).status_code == status, (path, action)
        r = await attempt(client, "read", "/x", bearer(signed(keys["d1"], "EdDSA", "d1", {"read": ["/y"]})))
        assert r.status_code == 403
    assert jwks.hits == 1


async def test_an_unknown_kid_refetches_at_most_once_per_10_seconds(jwks: JWKSServer, keys: dict[str, Any]) -> None:
    clock = Clock()
    async with serve(JWTAuth(jwks_url=jwks.url, clock=clock), "/s") as (client, _):
        assert (await attempt(client, "read", "/s", bearer(signed(keys["r1"], "RS256", "r1", ALL)))).status_code == 200
        assert jwks.hits == 1
        # The issuer adds a key: its first token makes us look again (once the interval has passed).
        jwks.document["keys"].append(public_jwk("r2", keys["r2"]))
        clock.advance(10)
        assert (await attempt(client, "read", "/s", bearer(signed(keys["r2"], "RS256", "r2", ALL)))).status_code == 200
        assert jwks.hits == 2
        # Garbage kids cannot make us hammer the JWKS server.
        for n in range(5):
            r = await attempt(client, "read", "/s", bearer(signed(keys["r2"], "RS256", f"nope{n}", ALL)))
            assert r.status_code == 401 and r.text == "unknown signing key"
        assert jwks.hits == 2
        clock.advance(10)
        for n in range(5):
            r = await attempt(client, "read", "/s", bearer(signed(keys["r2"], "RS256", f"again{n}", ALL)))
            assert r.status_code == 401 and r.text == "unknown signing key"
        assert jwks.hits == 3


async def test_stale_keys_are_refreshed_in_the_background(jwks: JWKSServer, keys: dict[str, Any]) -> None:
    clock = Clock()
    old = signed(keys["r1"], "RS256", "r1", ALL)
    async with serve(JWTAuth(jwks_url=jwks.url, jwks_cache_seconds=300, clock=clock), "/s") as (client, _):
        assert (await attempt(client, "read", "/s", bearer(old))).status_code == 200
        # The issuer rotates r1 out for r2; our keys go stale while the JWKS server is slow.
        jwks.document = {"keys": [public_jwk("r2", keys["r2"])]}
        jwks.hold = threading.Event()
        clock.advance(300)
        # Answered with the keys we have, while the refresh is still held by the server.
        assert (await attempt(client, "read", "/s", bearer(old))).status_code == 200
        await asyncio.to_thread(jwks.wait_for_hits, 2)
        jwks.hold.set()
        # The new key's token waits for (or finds) the refreshed keys; the old key is gone.
        assert (await attempt(client, "read", "/s", bearer(signed(keys["r2"], "RS256", "r2", ALL)))).status_code == 200
        r = await attempt(client, "read", "/s", bearer(signed(keys["r1"], "RS256", "r1", ALL, jti="new")))
        assert r.status_code == 401 and r.text == "unknown signing key"
    assert jwks.hits == 2


async def test_concurrent_requests_share_one_jwks_fetch(jwks: JWKSServer, keys: dict[str, Any]) -> None:
    auth = JWTAuth(jwks_url=jwks.url, clock=Clock())
    jwks.hold = threading.Event()
    entered = 0

    async def counting(request: Request, action: str, path: str) -> bool:
        # The fetch is held until the tenth request is in: the first nine are all waiting on it.
        nonlocal entered
        entered += 1
        if entered == 10:
            assert jwks.hold is not None
            jwks.hold.set()
        return await auth(request, action, path)

    token = signed(keys["d1"], "EdDSA", "d1", ALL)
    async with serve(counting, "/s") as (client, _):
        responses = await asyncio.gather(*(attempt(client, "read", "/s", bearer(token)) for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert jwks.hits == 1


async def test_algorithm_confusion_is_refused(jwks: JWKSServer, keys: dict[str, Any]) -> None:
    public = keys["r1"].public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    secret = b"a-shared-secret-in-the-jwks-32-bytes"
    jwks.document["keys"].append({"kty": "oct", "k": b64(secret), "kid": "o1"})
    jwks.document["keys"][0]["alg"] = "RS256"
    payload = {"exp": NOW + 3600, "ds": ALL}
    cases = {
        # HS256 keyed with the RSA public key (the classic confusion), and with the JWKS's oct key.
        forged({"alg": "HS256", "kid": "r1"}, payload, lambda m: hmac.new(pem, m, hashlib.sha256).digest()): (
            "token algorithm not accepted"
        ),
        forged({"alg": "HS256", "kid": "o1"}, payload, lambda m: hmac.new(secret, m, hashlib.sha256).digest()): (
            "token algorithm not accepted"
        ),
        forged({"alg": "none", "kid": "r1"}, payload): "token algorithm not accepted",
    }
    async with serve(JWTAuth(jwks_url=jwks.url, clock=Clock()), "/s") as (client, _):
        for token, message in cases.items():
            r = await attempt(client, "read", "/s", bearer(token))
            assert (r.status_code, r.text) == (401, message)
        assert jwks.hits == 0  # refused before any key is looked up
        more = {
            # A key is only used for its own type and declared algorithm.
            signed(keys["d1"], "EdDSA", "r1", ALL): "unknown signing key",
            signed(keys["r1"], "PS256", "r1", ALL): "unknown signing key",
            signed(keys["r1"], "RS256", "o1", ALL): "unknown signing key",
            signed(keys["r1"], "RS256", "e1", ALL): "unknown signing key",
            # The right kid, the wrong key.
            signed(keys["r2"], "RS256", "r1", ALL): "invalid token signature",
        }
        for token, message in more.items():
            r = await attempt(client, "read", "/s", bearer(token))
            assert (r.status_code, r.text) == (401, message)
        assert (await attempt(client, "read", "/s", bearer(signed(keys["r1"], "RS256", "r1", ALL)))).status_code == 200


async def test_an_unreachable_jwks_gives_503_with_retry_after(jwks: JWKSServer, keys: dict[str, Any]) -> None:
    clock = Clock()
    token = signed(keys["r1"], "RS256", "r1", ALL)
    jwks.status = 500
    async with serve(JWTAuth(jwks_url=jwks.url, clock=clock), "/s") as (client, _):
        for _ in range(3):
            r = await attempt(client, "read", "/s", bearer(token))
            assert (r.status_code, r.text, r.headers["retry-after"]) == (503, "cannot fetch the signing keys", "5")
        assert jwks.hits == 1  # failures are rate-limited too
        jwks.status = 200
        clock.advance(10)
        assert (await attempt(client, "read", "/s", bearer(token))).status_code == 200
        assert jwks.hits == 2
        # Down again when the keys go stale: the keys we have keep verifying...
        jwks.status = 500
        clock.advance(300)
        assert (await attempt(client, "read", "/s", bearer(token))).status_code == 200
        await asyncio.to_thread(jwks.wait_for_hits, 3)
        # ...but a kid we do not know cannot be looked up: that is 503, not a verdict on the token.
        clock.advance(10)
        r = await attempt(client, "read", "/s", bearer(signed(keys["r2"], "RS256", "r2", ALL)))
        assert r.status_code == 503
        # The failed refreshes have landed (that request waited for one): the old keys still verify.
        assert (
            await attempt(client, "read", "/s", bearer(signed(keys["r1"], "RS256", "r1", ALL, jti="new")))
        ).status_code == 200


async def test_a_jwks_server_that_is_not_there_gives_503(keys: dict[str, Any]) -> None:
    auth = JWTAuth(jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json", jwks_timeout=2, clock=Clock())
    async with serve(auth, "/s") as (client, _):
        r = await attempt(client, "read", "/s", bearer(signed(keys["r1"], "RS256", "r1", ALL)))
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


# -- any_of -----------------------------------------------------------------------------------------


async def test_any_of_accepts_static_tokens_and_jwts_and_explains_refusals() -> None:
    hook = any_of(TokenAuth(read_tokens=["reader"], write_tokens=["writer"]), JWTAuth(SECRET, clock=Clock()))
    async with serve(hook, "/s") as (client, _):
        assert (await attempt(client, "create", "/a", bearer("writer"))).status_code == 201
        assert (await attempt(client, "create", "/b", bearer(hs({"write": ["/b"]})))).status_code == 201
        assert (await attempt(client, "read", "/s", bearer("reader"))).status_code == 200
        # A recognised token refused (403) says more than another hook not knowing it (401).
        r = await attempt(client, "append", "/s", bearer("reader"))
        assert (r.status_code, r.text) == (403, "this token may only read")
        r = await attempt(client, "append", "/s", bearer(hs({"read": ["/s"]})))
        assert (r.status_code, r.text) == (403, "the token does not allow append on this stream")
        # Among 401s, the described one wins over the static tokens' "unknown token".
        r = await attempt(client, "read", "/s", bearer(hs({"read": ["/s"]}, exp=NOW - 60)))
        assert (r.status_code, r.text) == (401, "token expired")
        r = await attempt(client, "read", "/s", {})
        assert r.status_code == 401 and r.headers["www-authenticate"] == CHALLENGE


async def test_any_of_answers_503_when_a_hook_could_not_decide(keys: dict[str, Any]) -> None:
    down = JWTAuth(jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json", jwks_timeout=2, clock=Clock())
    hook = any_of(TokenAuth(write_tokens=["writer"]), down)
    async with serve(hook, "/s") as (client, _):
        assert (await attempt(client, "append", "/s", bearer("writer"))).status_code == 204
        r = await attempt(client, "append", "/s", bearer(signed(keys["r1"], "RS256", "r1", ALL)))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"


async def test_any_of_takes_sync_hooks_and_false_is_403() -> None:
    def refuse(request: Request, action: str, path: str) -> bool:
        return False

    def allow(request: Request, action: str, path: str) -> None:
        return None

    def sign_in(request: Request, action: str, path: str) -> bool:
        raise AccessDenied(401, "sign in", {"WWW-Authenticate": "Bearer"})

    async with serve(any_of(refuse, sign_in), "/s") as (client, _):
        r = await attempt(client, "read", "/s", {})
        assert (r.status_code, r.text) == (403, "forbidden")
    async with serve(any_of(sign_in, refuse, allow), "/s") as (client, _):
        assert (await attempt(client, "read", "/s", {})).status_code == 200
    with pytest.raises(ValueError):
        any_of()
