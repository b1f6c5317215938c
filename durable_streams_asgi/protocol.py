"""Request parsing and validation, and the mapping of errors to HTTP statuses, in one place.

Everything a client can get wrong is caught here (or by the storage, as a documented exception)
and becomes a 4xx with a short text body. Nothing in this module touches storage.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import unquote, urlsplit

from . import offsets
from .storage import base as st

MAX_SAFE_INTEGER = 2**53 - 1
# Paths longer than this are refused: they would be keys in every backend and appear in logs.
MAX_PATH_LENGTH = 1024
# A TTL beyond ~100 years is a client bug, and some backends cannot express it.
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


#: Response headers as ASGI wants them: (name, value) byte pairs.
Headers = list[tuple[bytes, bytes]]


def header(name: str, value: str) -> tuple[bytes, bytes]:
    return (name.encode("latin-1"), value.encode("latin-1"))


class ProtocolError(Exception):
    """A request the server will not carry out: ``status`` with a short text ``message``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


# -- headers ----------------------------------------------------------------------------------


def parse_closed(value: str | None) -> bool:
    """``Stream-Closed`` counts only when it is exactly ``true`` (any case); else it is absent."""
    return value is not None and value.strip().lower() == "true"


def parse_ttl(value: str) -> int:
    value = value.strip()
    if not _DECIMAL.fullmatch(value):
        raise bad_request("Stream-TTL must be a non-negative integer number of seconds")
    ttl = int(value)
    if ttl > MAX_TTL_SECONDS:
        raise bad_request("Stream-TTL is too large")
    return ttl


def parse_expires_at(value: str) -> float:
    """An RFC 3339 timestamp as Unix seconds."""
    value = value.strip()
    if not _RFC3339.fullmatch(value):
        raise bad_request("Stream-Expires-At must be an RFC 3339 timestamp")
    try:
        normalized = value.replace("z", "Z").replace("t", "T").replace(" ", "T")
        if normalized.endswith("Z"):
            normalized = normalized[:-1] + "+00:00"
        # fromisoformat takes at most 6 fractional digits.
        normalized = re.sub(r"(\.\d{6})\d+", r"\1", normalized)
        return datetime.fromisoformat(normalized).timestamp()
    except (ValueError, OverflowError) as exc:
        raise bad_request("Stream-Expires-At is not a valid date and time") from exc


def parse_expiry(ttl: str | None, expires_at: str | None) -> tuple[int | None, float | None]:
    if ttl is not None and expires_at is not None:
        raise bad_request("Stream-TTL and Stream-Expires-At cannot both be given")
    return (
        parse_ttl(ttl) if ttl is not None else None,
        parse_expires_at(expires_at) if expires_at is not None else None,
    )


def _producer_integer(name: str, value: str) -> int:
    value = value.strip()
    if not _DECIMAL.fullmatch(value) or int(value) > MAX_SAFE_INTEGER:
        raise bad_request(f"{name} must be an integer from 0 to 2^53-1")
    return int(value)


def parse_producer(producer_id: str | None, epoch: str | None, seq: str | None) -> st.Producer | None:
    """The idempotent-producer triple: all three headers or none."""
    present = [v is not None for v in (producer_id, epoch, seq)]
    if not any(present):
        return None
    if not all(present):
        raise bad_request("Producer-Id, Producer-Epoch and Producer-Seq must be sent together")
    assert producer_id is not None and epoch is not None and seq is not None
    if not producer_id.strip():
        raise bad_request("Producer-Id must not be empty")
    return st.Producer(
        producer_id,
        _producer_integer("Producer-Epoch", epoch),
        _producer_integer("Producer-Seq", seq),
    )


def parse_stream_seq(value: str | None) -> str | None:
    if value is None:
        return None
    if not value:
        raise bad_request("Stream-Seq must not be empty")
    return value


def parse_fork_offset(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return offsets.decode_offset(value.strip())
    except offsets.InvalidOffset as exc:
        raise bad_request("Stream-Fork-Offset is not a valid offset") from exc


def parse_fork_sub_offset(value: str | None) -> int:
    if value is None:
        return 0
    value = value.strip()
    if not _DECIMAL.fullmatch(value) or int(value) > MAX_SAFE_INTEGER:
        raise bad_request("Stream-Fork-Sub-Offset must be a non-negative integer")
    return int(value)


# -- query ------------------------------------------------------------------------------------

LIVE_MODES = frozenset({"long-poll", "sse"})


def parse_read_offset(value: str | None) -> int | None:
    """The ``offset`` parameter: a position, 0 for ``-1``/absent, None for ``now``."""
    if value is None or value == offsets.BEGINNING:
        return 0
    if value == offsets.NOW:
        return None
    try:
        return offsets.decode_offset(value)
    except offsets.InvalidOffset as exc:
        raise bad_request("offset is not valid") from exc


def parse_live(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in LIVE_MODES:
        raise bad_request("live must be long-poll or sse")
    return value


# -- paths ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)  # the same paths come again and again; results are immutable
@functools.lru_cache(maxsize=4096)
def validate_path(path: str) -> str:
    """The stream path below the mount point: no empty or dot segments, no control characters.

    Cached: the same paths come again and again (every append, every live read's round trip),
    and the character checks are a measurable share of a small request. Refusals raise, and
    are not cached."""
    if not path or path == "/":
        raise ProtocolError(404, "no stream path given")
    if len(path) > MAX_PATH_LENGTH:
        raise ProtocolError(414, "stream path is too long")
    stripped = path[1:] if path.startswith("/") else path
    for segment in stripped.split("/"):
        if segment in ("", ".", ".."):
            raise bad_request("stream path has an empty, '.' or '..' segment")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise bad_request("stream path contains control characters")
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: no URL can name them, no storage key hold them
            raise bad_request("stream path is not valid Unicode") from None
    return "/" + stripped


_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]*)?")


def _check_bracketed_host(netloc: str) -> None:
    """A host in brackets must be an IPv6 address: Python 3.11+'s urlsplit checks, 3.10's not."""
    host = netloc.rpartition("@")[2]
    if "[" in host or "]" in host:
        match = _BRACKETED.fullmatch(host)
        if match is None:
            raise ValueError("invalid bracketed host")
        ipaddress.IPv6Address(match.group(1))


def fork_source_path(value: str, root_path: str) -> str:
    """The stream path named by ``Stream-Forked-From``.

    Clients send the source's URL path as they address it (``/v1/stream/chat/1``) or a full URL;
    both are reduced to the path below this app's mount point, like the request path.
    """
    value = value.strip()
    if "://" in value:
        try:
            parts = urlsplit(value)
            _check_bracketed_host(parts.netloc)
        except ValueError as exc:  # an invalid host such as http://[x]/ or http://[::1/
            raise bad_request("Stream-Forked-From: not a valid URL") from exc
        value = parts.path
    value = unquote(value)
    if root_path and (value == root_path or value.startswith(root_path + "/")):
        value = value[len(root_path) :]
    if not value.startswith("/"):
        value = "/" + value
    try:
        return validate_path(value)
    except ProtocolError as exc:
        raise bad_request(f"Stream-Forked-From: {exc.message}") from exc


# -- storage errors -> HTTP -------------------------------------------------------------------


def storage_error(exc: st.StorageError) -> ProtocolError:
    """The one mapping from storage conditions to statuses."""
    if isinstance(exc, st.StreamNotFound):
        return ProtocolError(404, "stream not found")
    if isinstance(exc, st.StreamGone):
        return ProtocolError(410, "stream was deleted")
    if isinstance(exc, st.StreamExists):
        return ProtocolError(409, "stream exists with a different configuration")
    if isinstance(exc, st.StreamClosed):
        return ProtocolError(
            409,
            "stream is closed",
            {"Stream-Closed": "true", "Stream-Next-Offset": offsets.encode_offset(exc.tail)},
        )
    if isinstance(exc, st.ContentTypeMismatch):
        return ProtocolError(409, "content type does not match the stream's")
    if isinstance(exc, st.SequenceConflict):
        return ProtocolError(409, "Stream-Seq must increase")
    if isinstance(exc, st.StaleEpoch):
        return ProtocolError(403, "stale producer epoch", {"Producer-Epoch": str(exc.current_epoch)})
    if isinstance(exc, st.InvalidProducerSeq):
        return ProtocolError(400, "a new producer epoch must start at Producer-Seq 0")
    if isinstance(exc, st.ProducerSeqGap):
        return ProtocolError(
            409,
            "producer sequence gap",
            {"Producer-Expected-Seq": str(exc.expected), "Producer-Received-Seq": str(exc.received)},
        )
    if isinstance(exc, st.OffsetOutOfRange):
        return ProtocolError(400, "offset is past the end of the stream")
    if isinstance(exc, st.ForkSourceNotFound):
        return ProtocolError(404, "fork source stream not found")
    if isinstance(exc, st.ForkSourceGone):
        return ProtocolError(409, "fork source stream was deleted")
    if isinstance(exc, st.InvalidForkSubOffset):
        return ProtocolError(400, "Stream-Fork-Sub-Offset is past the next data boundary")
    if isinstance(exc, st.StorageUnavailable):
        return ProtocolError(503, "storage unavailable, retry shortly", {"Retry-After": "1"})
    if isinstance(exc, st.StorageFull):
        return ProtocolError(507, "storage full: nothing was written")
    return ProtocolError(500, "storage error")
