from __future__ import annotations

import json

import pytest

from durable_streams_asgi.jsonmode import InvalidJSON, join_messages, split_messages


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        (b'{"event": "created"}', [b'{"event": "created"}']),
        (b'[{"event": "a"}, {"event": "b"}]', [b'{"event": "a"}', b'{"event": "b"}']),
        (b"[[1,2], [3,4]]", [b"[1,2]", b"[3,4]"]),
        (b"[[[1,2,3]]]", [b"[[1,2,3]]"]),
        (b"  42 \n", [b"42"]),
        (b"null", [b"null"]),
        (b'[null, false, "s"]', [b"null", b"false", b'"s"']),
        (b"[]", []),
        (b" [ ] ", []),
    ],
)
def test_flattens_exactly_one_level(body: bytes, messages: list[bytes]) -> None:
    assert split_messages(body) == messages


def test_messages_keep_their_exact_text() -> None:
    # Re-encoding would turn these into Infinity, 1 and an escaped string.
    body = '[1e400, 1.0, "h\u00e9llo \u2603", 123456789012345678901234567890]'.encode()
    assert split_messages(body) == [b"1e400", b"1.0", '"h\u00e9llo \u2603"'.encode(), b"123456789012345678901234567890"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{ invalid json }",
        b"[1,]",
        b"[1 2]",
        b"[",
        b"NaN",
        b"[Infinity]",
        b"1 2",
        b"\xff\xfe",
        b'"unterminated',
        b"[1]]",
        b'{"a":1}x',
        "\ufeff[1]".encode(),
        b'"\x01"',
    ],
)
def test_rejects_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJSON):
        split_messages(body)


def test_rejects_absurd_nesting_without_crashing() -> None:
    with pytest.raises(InvalidJSON):
        split_messages(b"[" * 100_000)


def test_join_makes_one_array() -> None:
    messages = split_messages(b'[{"a":1}, [2], "x"]') + split_messages(b"3")
    assert json.loads(join_messages(messages)) == [{"a": 1}, [2], "x", 3]
    assert join_messages([]) == b"[]"


def test_a_message_limit_stops_parsing_early() -> None:
    from durable_streams_asgi.jsonmode import TooManyMessages

    assert len(split_messages(b"[1,2,3]", limit=3)) == 3
    with pytest.raises(TooManyMessages):
        split_messages(b"[1,2,3,4" + b",5" * 1_000_000 + b"]", limit=3)
    with pytest.raises(TooManyMessages):  # found before the array's end is even looked at
        split_messages(b"[1,2,3,4, not json at all", limit=3)
