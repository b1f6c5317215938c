"""The standalone server's settings: one table, read from flags and ``DURABLE_STREAMS_*`` variables.

Each setting is a flag of ``durable-streams-asgi serve`` and an environment variable named after
it (``--long-poll-timeout`` / ``DURABLE_STREAMS_LONG_POLL_TIMEOUT``): twelve-factor
configuration, where a container sets variables and a developer types flags. A flag given on the
command line wins over its variable; a variable wins over the default. A bad value in either is
reported with its name, before anything starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .storage.base import Storage
from .storage.memory import MemoryStorage

ENV_PREFIX = "DURABLE_STREAMS_"


class UsageError(Exception):
    """A bad command-line or environment value, reported without a traceback."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean (true/false): {text!r}")


def _words(text: str) -> list[str]:
    """A comma-separated list (tokens, origins): spaces around items are ignored."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class Setting:
    name: str  # the attribute: long_poll_timeout
    parse: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    boolean: bool = False
    secret: bool = False  # never shown in --help, even when set in the environment
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("host", str, "127.0.0.1", "address to bind (0.0.0.0 for every interface)"),
    S("port", _int, 4437, "port to listen on"),
    S(
        "storage",
        str,
        "memory",
        "'memory', or a Redis URL: redis://host:6379/0, rediss://... (TLS), unix://..., "
        "redis+sentinel://host:26379[,host:port...]/service[/db], "
        "redis+cluster://host:port[,host:port...]",
    ),
    S("key_prefix", str, "ds:", "prefix of every Redis key (servers sharing streams use the same)"),
    S("workers", _int, 1, "worker processes (Redis storage only for more than 1)"),
    S("long_poll_timeout", _positive_float, 30.0, "seconds a long-poll waits for data before answering 204"),
    S("sse_max_duration", _positive_float, 60.0, "seconds before an SSE response ends for the client to reconnect"),
    S("max_body_size", _int, 16 * 1024 * 1024, "largest create or append body in bytes (then 413)"),
    S("max_messages", _int, 10_000, "most JSON messages in one create or append (then 413)"),
    S("cors_origins", _words, ["*"], "allowed browser origins, comma-separated, or *", metavar="ORIGINS"),
    S("cache_visibility", str, "public", "Cache-Control of catch-up reads", choices=("public", "private")),
    S("read_token", _words, [], "bearer tokens that may read, comma-separated", secret=True, metavar="TOKENS"),
    S(
        "write_token",
        _words,
        [],
        "bearer tokens that may read and write, comma-separated",
        secret=True,
        metavar="TOKENS",
    ),
    S("jwt_secret", str, "", "verify JWT bearer tokens signed with this HMAC secret (HS256)", secret=True),
    S("jwt_jwks_url", str, "", "verify JWT bearer tokens with the keys of this JWKS URL (RS256, ES256, EdDSA...)"),
    S("jwt_audience", str, "", "required JWT 'aud'"),
    S("jwt_issuer", str, "", "required JWT 'iss'"),
    S("jwt_claim", str, "ds", 'the JWT claim granting paths per action: {"read": ["/chats/**"], "write": [...]}'),
    S("head_timeout", _positive_float, 10.0, "seconds a request head may take to arrive (then 408)"),
    S(
        "body_timeout",
        _positive_float,
        60.0,
        "seconds a request body may take after its head (then the connection closes)",
    ),
    S("max_head_size", _int, 64 * 1024, "most bytes of URL and headers in one request (then 431)"),
    S("limit_concurrency", _int, 10_000, "most connections and requests a worker holds at once (then 503)"),
    S(
        "drain_timeout",
        _positive_float,
        10.0,
        "seconds from SIGTERM to exit: live reads end at once, running generations get the rest",
    ),
    S("metrics", _boolean, True, "serve Prometheus metrics at /metrics", boolean=True),
    S(
        "allow_loopback_webhooks",
        _boolean,
        False,
        "let subscription webhooks call loopback addresses over http (development and tests only)",
        boolean=True,
    ),
    S("ssl_certfile", str, "", "serve HTTPS with this certificate (PEM; the chain may follow it)", metavar="FILE"),
    S("ssl_keyfile", str, "", "the certificate's private key (PEM)", metavar="FILE"),
    S("ssl_keyfile_password", str, "", "password of an encrypted private key", secret=True),
    S("proxy_headers", _boolean, True, "trust X-Forwarded-For/-Proto from --forwarded-allow-ips", boolean=True),
    S(
        "forwarded_allow_ips",
        str,
        "127.0.0.1",
        "addresses whose proxy headers are trusted, comma-separated, or *",
        metavar="IPS",
    ),
    S("root_path", str, "", "path prefix a proxy serves this server under and strips (e.g. /api)"),
    S("log_level", str, "info", "log level", choices=("critical", "error", "warning", "info", "debug")),
    S("log_format", str, "text", "log format: text, or json (one object per line)", choices=("text", "json")),
    S("access_log", _boolean, True, "log every request (at info level)", boolean=True),
)


def add_settings(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add every setting (or those ``names``) as a flag whose default is its variable's value."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        default = setting.default
        raw = os.environ.get(setting.env)
        if raw is not None:
            try:
                default = setting.parse(raw)
            except ValueError as exc:
                raise UsageError(f"{setting.env}: {exc}") from None
            if setting.choices and default not in setting.choices:
                raise UsageError(f"{setting.env}: must be one of {', '.join(setting.choices)} (got {raw!r})")
        shown = "" if setting.secret else f"; default {_show(setting.default)}"
        help_text = f"{setting.help} [{setting.env}{shown}]".replace("%", "%%")
        if setting.boolean:
            parser.add_argument(setting.flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(
                setting.flag,
                type=_argparse_type(setting.parse),
                default=default,
                choices=setting.choices,
                help=help_text,
                metavar=setting.metavar,
            )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value").lstrip("_")
    return convert


def check(config: dict[str, Any]) -> None:
    """Refuse settings that cannot work together or at all (``UsageError``)."""
    if config["workers"] < 1:
        raise UsageError("--workers must be at least 1")
    if not 0 <= config["port"] <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if config["max_head_size"] < 1024 or config["limit_concurrency"] < 1:
        raise UsageError("--max-head-size must be at least 1024 and --limit-concurrency at least 1")
    if config["max_body_size"] < 1 or config["max_messages"] < 1:
        raise UsageError("--max-body-size and --max-messages must be at least 1")
    if config["storage"] == "memory" and config["workers"] > 1:
        raise UsageError("memory storage lives in one process: use --workers 1, or Redis storage")
    if config["ssl_keyfile"] and not config["ssl_certfile"]:
        raise UsageError("--ssl-keyfile needs --ssl-certfile")
    for option in ("ssl_certfile", "ssl_keyfile"):
        if config[option] and not os.path.isfile(config[option]):
            raise UsageError(f"--{option.replace('_', '-')}: no such file: {config[option]}")
    if config["jwt_secret"] and config["jwt_jwks_url"]:
        raise UsageError("give --jwt-secret or --jwt-jwks-url, not both")
    if config["jwt_jwks_url"] and urlsplit(config["jwt_jwks_url"]).scheme not in ("http", "https"):
        raise UsageError("--jwt-jwks-url must be an http:// or https:// URL")
    if (config["jwt_audience"] or config["jwt_issuer"]) and not (config["jwt_secret"] or config["jwt_jwks_url"]):
        raise UsageError("--jwt-audience and --jwt-issuer need --jwt-secret or --jwt-jwks-url")
    for origin in config["cors_origins"]:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
            raise UsageError(f"--cors-origins: not an origin (scheme://host[:port]): {origin!r}")
    if "*" in config["cors_origins"] and len(config["cors_origins"]) > 1:
        raise UsageError("--cors-origins: '*' allows every origin; give it alone")
    root = config["root_path"]
    if root and (not root.startswith("/") or root.endswith("/")):
        raise UsageError("--root-path must start with '/' and not end with one (e.g. /api)")


def make_storage(spec: str, key_prefix: str = "ds:") -> Storage:
    """``memory`` or a ``redis://`` / ``rediss://`` / ``unix://`` URL."""
    if spec == "memory":
        return MemoryStorage()
    schemes = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
    if spec.startswith(tuple(f"{scheme}://" for scheme in schemes)):
        try:
            from .storage.redis import RedisStorage
        except ImportError as exc:  # pragma: no cover - depends on the installed version
            raise UsageError(f"Redis storage is not available: {exc}") from exc
        try:
            return RedisStorage.from_url(spec, key_prefix=key_prefix)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    raise UsageError(f"unknown storage {spec!r}: use 'memory' or a redis:// URL")
