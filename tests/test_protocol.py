from __future__ import annotations

from datetime import datetime, timezone

import pytest

from durable_streams_asgi import protocol
from durable_streams_asgi.protocol import ProtocolError
from durable_streams_asgi.storage import base as st


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("60", 60), ("3600", 3600), (" 5 ", 5)])
def test_ttl_accepts_plain_decimal(value: str, expected: int) -> None:
    assert protocol.parse_ttl(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "-1", "00060", "+60", "60.5", "1e3", "0x10", "6 0", "99999999999999"])
def test_ttl_rejects_everything_else(value: str) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.parse_ttl(value)
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("2030-01-02T03:04:05.123Z", datetime(2030, 1, 2, 3, 4, 5, 123000, tzinfo=timezone.utc)),
        ("2030-01-02T03:04:05+00:00", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("2030-01-02T05:04:05+02:00", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)),
        ("2030-01-02t03:04:05.123456789z", datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)),
    ],
)
def test_expires_at_accepts_rfc3339(value: str, expected: datetime) -> None:
    assert protocol.parse_expires_at(value) == pytest.approx(expected.timestamp())


@pytest.mark.parametrize(
    "value",
    [
        "not-a-timestamp",
        "2030-01-02",
        "2030-01-02T03:04:05",
        "2030-13-02T03:04:05Z",
        "2030-02-30T00:00:00Z",
        "1735689600",
        "2030-01-02T25:00:00Z",
    ],
)
def test_expires_at_rejects_non_rfc3339(value: str) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.parse_expires_at(value)
    assert err.value.status == 400


def test_ttl_and_expires_at_together_are_refused() -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_expiry("60", "2030-01-02T03:04:05Z")


@pytest.mark.parametrize(
    ("value", "closed"),
    [
        ("true", True),
        ("TRUE", True),
        (" True ", True),
        ("false", False),
        ("yes", False),
        ("1", False),
        ("", False),
        (None, False),
    ],
)
def test_stream_closed_only_counts_true(value: str | None, closed: bool) -> None:
    assert protocol.parse_closed(value) is closed


def test_producer_headers() -> None:
    assert protocol.parse_producer(None, None, None) is None
    assert protocol.parse_producer("p", "3", "0") == st.Producer("p", 3, 0)
    assert protocol.parse_producer("p", str(2**53 - 1), "7") == st.Producer("p", 2**53 - 1, 7)


@pytest.mark.parametrize(
    "headers",
    [
        ("p", None, None),
        (None, "0", None),
        ("p", "0", None),
        ("", "0", "0"),
        ("  ", "0", "0"),
        ("p", "1e3", "0"),
        ("p", "-1", "0"),
        ("p", "0", "1abc"),
        ("p", "0xyz", "0"),
        ("p", str(2**53), "0"),
        ("p", "0", "01"),
    ],
)
def test_producer_headers_rejected(headers: tuple[str | None, str | None, str | None]) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.parse_producer(*headers)
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("value", "position"), [(None, 0), ("-1", 0), ("now", None), ("0000000000000000_0000000000000042", 42)]
)
def test_read_offset(value: str | None, position: int | None) -> None:
    assert protocol.parse_read_offset(value) == position


@pytest.mark.parametrize(
    "value", ["", "0,1", "0 1", "42", "-2", "NOW", "../x", "0000000000000000_0000000000000042\n", "0000000000000042"]
)
def test_read_offset_rejected(value: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_read_offset(value)


@pytest.mark.parametrize("path", ["/a", "/a/b/c", "/chat/room-1/msgs", "/caf\u00e9", "/a.b/..c"])
def test_valid_paths(path: str) -> None:
    assert protocol.validate_path(path) == path


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/a//b", 400),
        ("/a/../b", 400),
        ("/./a", 400),
        ("/a/", 400),
        ("/a\x00b", 400),
        ("/a\nb", 400),
        ("/a\x7f", 400),
        ("/a\udcffb", 400),  # a lone surrogate: no URL names it, no storage key holds it
        ("/" + "x" * 2000, 414),
        ("/", 404),
        ("", 404),
    ],
)
def test_invalid_paths(path: str, status: int) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.validate_path(path)
    assert err.value.status == status


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (st.StreamNotFound("x"), 404, {}),
        (st.StreamGone("x"), 410, {}),
        (st.StreamExists("x"), 409, {}),
        (st.StreamClosed(7), 409, {"Stream-Closed": "true", "Stream-Next-Offset": "0000000000000000_0000000000000007"}),
        (st.ContentTypeMismatch("x"), 409, {}),
        (st.SequenceConflict("x"), 409, {}),
        (st.StaleEpoch(4), 403, {"Producer-Epoch": "4"}),
        (st.InvalidProducerSeq(3), 400, {}),
        (st.ProducerSeqGap(2, 5), 409, {"Producer-Expected-Seq": "2", "Producer-Received-Seq": "5"}),
        (st.OffsetOutOfRange(9), 400, {}),
        (st.ForkSourceNotFound("x"), 404, {}),
        (st.ForkSourceGone("x"), 409, {}),
        (st.InvalidForkSubOffset("x"), 400, {}),
        (st.StorageUnavailable("down"), 503, {"Retry-After": "1"}),
    ],
)
def test_storage_errors_map_to_statuses(error: st.StorageError, status: int, headers: dict[str, str]) -> None:
    mapped = protocol.storage_error(error)
    assert mapped.status == status
    assert mapped.headers == headers
    assert mapped.message and "\n" not in mapped.message
