"""Built-in ``authorize`` hooks: static bearer tokens, JWTs (HMAC secret or JWKS), and ``any_of``.

:class:`TokenAuth` and :class:`JWTAuth` read ``Authorization: Bearer <token>``; :func:`any_of` accepts
a request that any of several hooks accepts. A JWT's permissions are its ``ds`` claim: an object
mapping an action (or ``write``, for every action but ``read``) to a list of path globs, e.g.
``{"read": ["/chats/**"], "write": ["/chats/42", "/users/7/*"]}`` (see :class:`PathGlob`).

PyJWT (the ``auth`` extra) is imported only when a :class:`JWTAuth` is made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import inspect
import json
import logging
import re
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from .globs import PathGlob, glob_match
from .options import AccessDenied, Authorize

__all__ = ["JWTAuth", "PathGlob", "TokenAuth", "any_of", "glob_match"]

logger = logging.getLogger("durable_streams_asgi.auth")

ACTIONS = ("read", "create", "append", "close", "delete", "subscribe")
WRITE_ACTIONS = ("create", "append", "close", "delete", "subscribe")
CHALLENGE = 'Bearer realm="durable-streams"'

_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: The key type (and curves) each asymmetric algorithm verifies with: a JWKS key of another type is
#: never tried, so a token cannot pick how a key is used (no RSA key as an HMAC secret, and so on).
_KEY_FIT: dict[str, tuple[str, frozenset[str] | None]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
_EC_ALGORITHM = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

_REFETCH_INTERVAL = 10.0  # at most one JWKS fetch per this many seconds, whatever the tokens' kids
_MAX_JWKS_BYTES = 1 << 20
_TOKEN_CACHE_SIZE = 1024
_MAX_CACHED_TOKEN = 8192  # bytes: bounds the cache at about 8 MiB of token strings
_MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as its hash
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: no space, nothing a header cannot carry
_INSTALL_HINT = "JWTAuth needs PyJWT with cryptography: pip install 'durable-streams-asgi[auth]'"


class _Grants:
    """What a ``ds`` claim allows: its globs per action."""

    __slots__ = ("_by_action",)

    def __init__(self, claim: object) -> None:
        if not isinstance(claim, dict):
            raise ValueError("not an object")
        globs: dict[str, list[PathGlob]] = {action: [] for action in ACTIONS}
        for key, patterns in claim.items():
            targets = WRITE_ACTIONS if key == "write" else (key,) if key in ACTIONS else ()
            if not targets:
                continue  # an action this server does not know: nothing it could grant here
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{key!r} is not a list of path patterns")
            compiled = [PathGlob(p) for p in patterns]
            for target in targets:
                globs[target] += compiled
        self._by_action = {a: tuple(gs) for a, gs in globs.items() if gs}

    def allows(self, action: str, path: str) -> bool:
        return any(glob.match(path) for glob in self._by_action.get(action, ()))


# -- bearer tokens ----------------------------------------------------------------------------------


def _bearer(request: Request) -> str:
    value = request.headers.get("authorization")
    if value is None:
        raise AccessDenied(401, "an Authorization: Bearer token is required", {"WWW-Authenticate": CHALLENGE})
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN_CHARS.fullmatch(token):
        raise AccessDenied(401, "the Authorization header is not 'Bearer <token>'", {"WWW-Authenticate": CHALLENGE})
    return token


def _invalid_token(description: str | None, message: str = "invalid token") -> AccessDenied:
    """401 for a token we cannot accept. ``description`` (a fixed text: no quotes) goes in the
    challenge too, which also tells :func:`any_of` that this hook recognised the token's kind."""
    challenge = f'{CHALLENGE}, error="invalid_token"'
    if description is not None:
        challenge += f', error_description="{description}"'
        message = description
    return AccessDenied(401, message, {"WWW-Authenticate": challenge})


def _forbidden(message: str) -> AccessDenied:
    return AccessDenied(403, message, {"WWW-Authenticate": f'{CHALLENGE}, error="insufficient_scope"'})


def _digest(token: str) -> bytes:
    # Digests have one length, so comparing them tells nothing about the tokens' lengths either.
    return hashlib.sha256(token.encode("utf-8")).digest()


def _any_equal(digest: bytes, digests: Sequence[bytes]) -> bool:
    found = False
    for candidate in digests:  # no early exit: the time taken says nothing about which one matched
        found |= hmac.compare_digest(digest, candidate)
    return found


def _token_digests(tokens: Iterable[str], kind: str) -> list[bytes]:
    if isinstance(tokens, str):
        raise TypeError(f"{kind} must be a list of tokens, not one string")
    digests = []
    for token in tokens:
        if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
            raise ValueError(f"{kind}: a token must be a non-empty string of visible ASCII characters")
        digests.append(_digest(token))
    return digests


class TokenAuth:
    """Static bearer tokens: a write token allows every action, a read token only ``read``.

    Missing or malformed credentials and unknown tokens get 401, a read token asking to write 403.
    """

    def __init__(self, read_tokens: Iterable[str] = (), write_tokens: Iterable[str] = ()) -> None:
        self._read = _token_digests(read_tokens, "read_tokens")
        self._write = _token_digests(write_tokens, "write_tokens")
        if not self._read and not self._write:
            raise ValueError("TokenAuth needs at least one token")

    def __call__(self, request: Request, action: str, path: str) -> bool:
        digest = _digest(_bearer(request))
        writer = _any_equal(digest, self._write)
        reader = _any_equal(digest, self._read)
        if writer or (reader and action == "read"):
            return True
        if reader:
            raise _forbidden("this token may only read")
        raise _invalid_token(None, "unknown token")


# -- JWTs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims checked out; its times are checked again on every use."""

    grants: _Grants | None
    refusal: str  # why it grants nothing, when grants is None
    exp: float
    nbf: float | None
    verified_at: float


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any  # a cryptography public key


def _unavailable() -> AccessDenied:
    return AccessDenied(503, "cannot fetch the signing keys", {"Retry-After": "5"})


def _is_time(value: object) -> bool:
    # Compared, not converted: NaN, infinities and huge integers (JSON has no limit) all fail.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1e15 < value < 1e15


class _JWKS:
    """The keys of a JWKS URL, fetched in a worker thread and shared by every event loop.

    One fetch at a time and at most one per ``_REFETCH_INTERVAL``; keys older than
    ``cache_seconds`` are refreshed in the background while the old ones keep verifying (also
    when the refresh fails: a JWKS outage does not turn away tokens we can still check).
    """

    def __init__(self, jwt: Any, url: str, cache_seconds: float, timeout: float, clock: Callable[[], float]) -> None:
        self._jwt, self._url, self._cache_seconds, self._timeout, self._clock = jwt, url, cache_seconds, timeout, clock
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds-jwks")
        self._keys: list[_Key] | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._last_ok = False
        self._inflight: concurrent.futures.Future[bool] | None = None

    async def keys_for(self, kid: str | None, alg: str) -> list[Any]:
        """The keys that may verify a token with this ``kid`` and ``alg``; raises 401 or 503."""
        now = self._clock()
        if self._keys is None:
            await self._refresh()
        elif not self._fetched_at <= now < self._fetched_at + self._cache_seconds:
            self._start()
        found = self._matching(kid, alg)
        # An unknown kid may be a key the issuer has just added: look again (rate-limited).
        if not found and await self._refresh():
            found = self._matching(kid, alg)
        if found:
            return found
        if self._keys is None or not self._last_ok:
            raise _unavailable()
        raise _invalid_token("unknown signing key")

    def _matching(self, kid: str | None, alg: str) -> list[Any]:
        kty, curves = _KEY_FIT[alg]
        return [
            k.key
            for k in self._keys or ()
            if (kid is None or k.kid == kid)
            and k.kty == kty
            and (curves is None or k.crv in curves)
            and k.alg in (None, alg)
        ]

    def _start(self) -> concurrent.futures.Future[bool] | None:
        """The fetch under way, or a new one; None when the last began under the interval ago."""
        with self._lock:
            if self._inflight is None or self._inflight.done():
                now = self._clock()
                # A clock that went back (now < last attempt) does not hold fetches off.
                if self._last_attempt is not None and 0 <= now - self._last_attempt < _REFETCH_INTERVAL:
                    return None
                self._last_attempt = now
                self._inflight = self._executor.submit(self._fetch_and_store, now)
            return self._inflight

    async def _refresh(self) -> bool:
        """Wait for a fetch (the one under way, shared by every request waiting): did it succeed?"""
        future = self._start()
        if future is None:
            return False
        # Shielded: a client that goes away must not cancel the fetch the others wait for.
        return await asyncio.shield(asyncio.wrap_future(future))

    def _fetch_and_store(self, started: float) -> bool:
        try:
            keys = self._fetch()
        except Exception as exc:  # any failure: the network, the status, the document
            logger.warning("cannot fetch the JWKS at %s: %s", self._url, exc)
            keys = None
        with self._lock:
            self._inflight = None
            self._last_ok = keys is not None
            if keys is not None:
                self._keys, self._fetched_at = keys, started
        return keys is not None

    def _fetch(self) -> list[_Key]:
        request = urllib.request.Request(self._url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self._timeout) as response:  # raises on non-2xx
            body = response.read(_MAX_JWKS_BYTES + 1)
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("the document is too large")
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS document")
        return [key for jwk in document["keys"] if (key := self._parse(jwk)) is not None]

    def _parse(self, jwk: object) -> _Key | None:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            return None
        kty, crv, alg, kid = jwk.get("kty"), jwk.get("crv"), jwk.get("alg"), jwk.get("kid")
        # Symmetric ("oct") keys are never taken from a JWKS: whoever can read it could sign.
        as_alg = {"RSA": "RS256", "EC": _EC_ALGORITHM.get(crv) if isinstance(crv, str) else None, "OKP": "EdDSA"}
        if as_alg.get(kty) is None or (alg is not None and alg not in _KEY_FIT):
            return None
        try:
            key = self._jwt.PyJWK(jwk, algorithm=as_alg[kty]).key
        except (self._jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            logger.warning("skipping an unusable key (kid %r) in the JWKS at %s: %s", kid, self._url, exc)
            return None
        return _Key(kid if isinstance(kid, str) else None, kty, crv, alg, key)


class JWTAuth:
    """JWT bearer tokens, verified with an HMAC ``secret`` or the keys at ``jwks_url`` (one of them).

    ``exp`` is required, ``nbf`` honoured (both with ``leeway`` seconds), ``aud`` and ``iss``
    checked when ``audience``/``issuer`` are given (a token with an ``aud`` is refused when no
    ``audience`` is). Permissions are the ``claim`` claim (see the module docstring). Verified
    tokens are cached by their text (the times are checked on every use; the signature again
    after ``jwks_cache_seconds``). ``clock`` gives the time (seconds since the epoch).
    """

    def __init__(
        self,
        secret: str | bytes | None = None,
        jwks_url: str | None = None,
        *,
        algorithms: Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        issuer: str | Sequence[str] | None = None,
        claim: str = "ds",
        leeway: float = 30.0,
        jwks_cache_seconds: float = 300,
        jwks_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            import jwt
            from jwt.algorithms import has_crypto
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        if (secret is None) == (jwks_url is None):
            raise ValueError("JWTAuth takes exactly one of secret (HMAC) or jwks_url")
        if isinstance(algorithms, str):
            raise TypeError("algorithms must be a list of names, not one string")
        self._jwt = jwt
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._keys: _JWKS | None = None
        if self._secret is not None:
            allowed: Sequence[str] = _HMAC_ALGORITHMS
            if len(self._secret) < _MIN_SECRET_BYTES:
                raise ValueError(f"the JWT secret must be at least {_MIN_SECRET_BYTES} bytes")
        else:
            # Never HS* or "none" with a JWKS: a public key must not become an HMAC secret.
            allowed = tuple(_KEY_FIT)
            if not has_crypto:
                raise ImportError(_INSTALL_HINT)
            if not str(jwks_url).startswith(("https://", "http://")):
                raise ValueError("jwks_url must be an http(s) URL")
            self._keys = _JWKS(jwt, str(jwks_url), jwks_cache_seconds, jwks_timeout, clock)
        self._algorithms = tuple(allowed if algorithms is None else algorithms)
        refused = [alg for alg in self._algorithms if alg not in allowed]
        if refused or not self._algorithms:
            raise ValueError(f"algorithms not usable with {'a secret' if secret else 'a JWKS'}: {refused}")
        self._audience, self._issuer, self._claim, self._leeway = audience, issuer, claim, leeway
        self._recheck, self._clock = jwks_cache_seconds, clock
        # Times are ours to check (with our clock and leeway, also for cached tokens); "iat" is not
        # a permission, so a clock skew on it must not refuse anyone.
        self._options = {"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False}
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._refusals = (
            (jwt.InvalidAudienceError, "token audience not accepted"),
            (jwt.InvalidIssuerError, "token issuer not accepted"),
            (jwt.DecodeError, "malformed token"),
        )

    async def __call__(self, request: Request, action: str, path: str) -> bool:
        token = _bearer(request)
        now = self._clock()
        verified = self._cached(token, now)
        if verified is None:
            verified = await self._verify(token, now)
            if len(token) <= _MAX_CACHED_TOKEN:
                with self._cache_lock:
                    self._cache[token] = verified
                    if len(self._cache) > _TOKEN_CACHE_SIZE:
                        self._cache.popitem(last=False)
        if now >= verified.exp + self._leeway:
            raise _invalid_token("token expired")
        if verified.nbf is not None and now + self._leeway < verified.nbf:
            raise _invalid_token("token not yet valid")
        if verified.grants is None:
            raise _forbidden(verified.refusal)
        if not verified.grants.allows(action, path):
            raise _forbidden(f"the token does not allow {action} on this stream")
        return True

    def _cached(self, token: str, now: float) -> _Verified | None:
        with self._cache_lock:
            verified = self._cache.get(token)
            if verified is None:
                return None
            if not verified.verified_at <= now < verified.verified_at + self._recheck:
                del self._cache[token]  # verify again: its key may have left the JWKS since
                return None
            self._cache.move_to_end(token)
            return verified

    async def _verify(self, token: str, now: float) -> _Verified:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid_token("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._algorithms:  # before any key is looked up: "none", HS* with a JWKS
            raise _invalid_token("token algorithm not accepted")
        if kid is not None and not isinstance(kid, str):
            raise _invalid_token("malformed token")
        keys = [self._secret] if self._keys is None else await self._keys.keys_for(kid, alg)
        payload = self._decode(token, keys, alg)
        exp, nbf = payload["exp"], payload.get("nbf")
        if not _is_time(exp) or (nbf is not None and not _is_time(nbf)):
            raise _invalid_token("malformed token")
        claim = payload.get(self._claim)
        grants, refusal = None, f"the token has no '{self._claim}' claim, so it grants no access"
        if claim is not None:
            try:
                grants = _Grants(claim)
            except ValueError:
                refusal = f"the token's '{self._claim}' claim is malformed, so it grants no access"
        return _Verified(grants, refusal, float(exp), None if nbf is None else float(nbf), now)

    def _decode(self, token: str, keys: Sequence[Any], alg: str) -> dict[str, Any]:
        jwt = self._jwt
        for key in keys:  # several only for a token without a kid
            try:
                return jwt.decode(
                    token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer, options=self._options
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as exc:
                raise _invalid_token(f"token has no '{exc.claim}' claim") from None
            except jwt.PyJWTError as exc:
                refusal = next((text for kind, text in self._refusals if isinstance(exc, kind)), "invalid token")
                raise _invalid_token(refusal) from None
        raise _invalid_token("invalid token signature")


# -- combining hooks --------------------------------------------------------------------------------


def _weight(refusal: AccessDenied) -> tuple[int, int]:
    """How telling a refusal is: 503 (we could not decide) over 403 (credentials recognised) over
    other statuses over 401; among equals, a challenge that describes the error wins."""
    rank = {503: 3, 403: 2, 401: 0}.get(refusal.status, 1)
    challenge = refusal.headers.get("WWW-Authenticate", "")
    return rank, 2 if "error_description=" in challenge else 1 if "error=" in challenge else 0


def any_of(*hooks: Authorize) -> Callable[[Request, str, str], Awaitable[bool]]:
    """An ``authorize`` hook that allows what any of ``hooks`` (sync or async, asked in order)
    allows; otherwise it raises the most telling refusal (see :func:`_weight`; ties go to the
    earlier hook). A hook returning False counts as a plain 403."""
    if not hooks:
        raise ValueError("any_of needs at least one hook")

    async def authorize(request: Request, action: str, path: str) -> bool:
        refusals: list[AccessDenied] = []
        for hook in hooks:
            try:
                verdict = hook(request, action, path)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except AccessDenied as exc:
                refusals.append(exc)
                continue
            if verdict is not False:
                return True
            refusals.append(AccessDenied(403, "forbidden"))
        raise max(refusals, key=_weight)

    return authorize
