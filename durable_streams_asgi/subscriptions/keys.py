"""The server's secrets for subscriptions, kept in the storage so every process shares them:
the Ed25519 keys that sign webhooks (published as a JWK Set), and the HMAC secret of callback and
claim tokens.

Keys are made on first use by whichever process gets there first (a record written only if
absent), survive restarts with the storage (on Redis), and rotate with :meth:`Keys.rotate`: the
new key signs from then on, and the old public key stays published for ``RETIRED_KEPT_MS``, past
any receiver's replay window (5 minutes) plus the JWK Set's cache lifetime (5 minutes). Anyone
who can read the storage can read these keys, as they can read the streams: protect it alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..storage.base import Record, RecordConflict, Storage
from .model import SubscriptionError

SPACE = "__ds"
SIGNING_RECORD = "webhook-signing-keys"
TOKEN_RECORD = "token-secret"
RETIRED_KEPT_MS = 15 * 60 * 1000
CACHE_SECONDS = 30.0  # how soon every process signs with a key rotated elsewhere
TOKEN_LIFETIME_S = 24 * 3600  # fencing ends a token's use long before: this bounds a leaked one


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    x: str  # the public key, base64url

    def jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "use": "sig", "alg": "EdDSA", "x": self.x}


def _key(seed: bytes) -> SigningKey:
    private = Ed25519PrivateKey.from_private_bytes(seed)
    x = _b64(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    # RFC 7638 thumbprint: the required members, sorted, no spaces. Stable for the key's life.
    thumbprint = hashlib.sha256(json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":")).encode())
    return SigningKey("ds_" + _b64(thumbprint.digest()), private, x)


def _new_entry(now_ms: int) -> dict[str, Any]:
    return {"seed": _b64(os.urandom(32)), "created_ms": now_ms, "retired_ms": None}


class Keys:
    """The signing keys and token secret of one storage, cached for ``CACHE_SECONDS``."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._entries: list[dict[str, Any]] | None = None
        self._loaded_at = 0.0
        self._secret: bytes | None = None

    async def _load(self) -> list[dict[str, Any]]:
        if self._entries is not None and time.monotonic() - self._loaded_at < CACHE_SECONDS:
            return self._entries
        record = await self._get_or_create(SIGNING_RECORD, lambda: self._encode([_new_entry(0)]))
        self._entries = json.loads(record.value)["keys"]
        self._loaded_at = time.monotonic()
        return self._entries

    async def _get_or_create(self, key: str, make: Callable[[], bytes]) -> Record:
        """The record ``key``, written with ``make()`` first if absent; when another process
        writes it first, theirs is the one every process uses."""
        record = await self._storage.get_record(SPACE, key)
        if record is None:
            try:
                record = await self._storage.put_record(SPACE, key, make(), 0)
            except RecordConflict as exc:
                record = exc.current
                assert record is not None
        return record

    @staticmethod
    def _encode(entries: list[dict[str, Any]]) -> bytes:
        return json.dumps({"keys": entries}, separators=(",", ":")).encode()

    async def signing_key(self) -> SigningKey:
        """The key that signs now: the newest not retired."""
        entries = await self._load()
        return _key(_unb64(next(e for e in reversed(entries) if e["retired_ms"] is None)["seed"]))

    async def jwks(self) -> dict[str, Any]:
        """The JWK Set: the signing key and the keys retired within ``RETIRED_KEPT_MS``."""
        entries = await self._load()
        now = int(time.time() * 1000)
        kept = [e for e in entries if e["retired_ms"] is None or now - e["retired_ms"] < RETIRED_KEPT_MS]
        return {"keys": [_key(_unb64(e["seed"])).jwk() for e in reversed(kept)]}

    async def sign(self, body: bytes) -> str:
        """The ``Webhook-Signature`` header for ``body``: Ed25519 over ``<t>.<body>``."""
        key = await self.signing_key()
        t = str(int(time.time()))
        signature = key.private.sign(t.encode() + b"." + body)
        return f"t={t},kid={key.kid},ed25519={_b64(signature)}"

    async def rotate(self) -> str:
        """Retire the signing key and make a new one (for every process within ``CACHE_SECONDS``);
        the new key's id. Keys retired longer ago than ``RETIRED_KEPT_MS`` are forgotten."""
        while True:
            record = await self._storage.get_record(SPACE, SIGNING_RECORD)
            now = int(time.time() * 1000)
            entries = [] if record is None else json.loads(record.value)["keys"]
            for entry in entries:
                if entry["retired_ms"] is None:
                    entry["retired_ms"] = now
            entries = [e for e in entries if now - e["retired_ms"] < RETIRED_KEPT_MS]
            fresh = _new_entry(now)
            try:
                await self._storage.put_record(
                    SPACE, SIGNING_RECORD, self._encode([*entries, fresh]), record.version if record else 0
                )
            except RecordConflict:
                continue
            self._entries = None
            return _key(_unb64(fresh["seed"])).kid

    # -- tokens ----------------------------------------------------------------------------------

    async def _token_secret(self) -> bytes:
        if self._secret is None:
            record = await self._get_or_create(TOKEN_RECORD, lambda: _b64(os.urandom(32)).encode())
            self._secret = _unb64(record.value.decode())
        return self._secret

    async def mint(self, subscription_id: str, generation: int, wake_id: str) -> str:
        """A token for one wake of one subscription (a webhook's callback, a pull-wake claim)."""
        claims = {
            "sub": subscription_id,
            "gen": generation,
            "wake": wake_id,
            "exp": int(time.time()) + TOKEN_LIFETIME_S,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(await self._token_secret(), payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(mac)}"

    async def verify(self, token: str, subscription_id: str) -> dict[str, Any]:
        """The token's claims, if this server minted it for this subscription and it has not
        expired; 401 ``TOKEN_INVALID`` or ``TOKEN_EXPIRED`` otherwise."""
        payload, _, mac = token.partition(".")
        try:
            expected = hmac.new(await self._token_secret(), payload.encode(), hashlib.sha256).digest()
            valid = hmac.compare_digest(_unb64(mac), expected)
            claims = json.loads(_unb64(payload)) if valid else None
        except (ValueError, UnicodeError):
            claims = None
        if not isinstance(claims, dict) or claims.get("sub") != subscription_id:
            raise SubscriptionError(401, "TOKEN_INVALID", "the token is not valid for this subscription")
        if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
            raise SubscriptionError(401, "TOKEN_EXPIRED", "the token has expired")
        return claims
