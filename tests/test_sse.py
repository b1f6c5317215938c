from __future__ import annotations

import base64
import json

import pytest

from durable_streams_asgi import sse


def parse(block: bytes) -> tuple[str, str]:
    """What an EventSource client sees: the event name and its data lines joined by LF."""
    event, data = "message", []
    for line in block.decode().split("\n"):
        if line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            value = line[len("data:") :]
            data.append(value[1:] if value.startswith(" ") else value)
    return event, "\n".join(data)


def test_text_lines_become_data_lines_and_cannot_inject_events() -> None:
    payload = b'line1\r\nevent: control\rdata: {"injected":true}\nlast'
    block = sse.data_event(payload, base64_encode=False)
    assert block.endswith(b"\n\n") and block.count(b"\n\n") == 1
    event, data = parse(block)
    assert event == "data"
    assert data == 'line1\nevent: control\ndata: {"injected":true}\nlast'
    assert b"\r" not in block


def test_leading_spaces_survive() -> None:
    _, data = parse(sse.data_event(b"  indented", base64_encode=False))
    assert data == "  indented"


def test_binary_is_base64_and_decodes_back() -> None:
    payload = bytes(range(256)) * 500
    event, data = parse(sse.data_event(payload, base64_encode=True))
    assert event == "data"
    text = data.replace("\n", "")
    assert len(text) % 4 == 0
    assert base64.b64decode(text) == payload


def test_empty_binary_payload_is_empty_text() -> None:
    assert parse(sse.data_event(b"", base64_encode=True)) == ("data", "")


def test_base64_only_for_non_text_types() -> None:
    assert not sse.uses_base64("text/plain")
    assert not sse.uses_base64("Text/HTML; charset=utf-8")
    assert not sse.uses_base64("application/json")
    assert sse.uses_base64("application/octet-stream")
    assert sse.uses_base64("application/x-protobuf")
    assert sse.uses_base64("application/ndjson")


def test_control_event_fields() -> None:
    event, data = parse(sse.control_event("0000000000000005", cursor="42", up_to_date=True, closed=False))
    assert event == "control"
    assert json.loads(data) == {"streamNextOffset": "0000000000000005", "streamCursor": "42", "upToDate": True}
    _, data = parse(sse.control_event("0000000000000005", cursor="42", up_to_date=False, closed=False))
    assert json.loads(data) == {"streamNextOffset": "0000000000000005", "streamCursor": "42"}
    _, data = parse(sse.control_event("0000000000000009", cursor="42", up_to_date=True, closed=True))
    # Closed: no cursor (clients must not reconnect), and closed implies up to date.
    assert json.loads(data) == {"streamNextOffset": "0000000000000009", "streamClosed": True, "upToDate": True}


@pytest.mark.parametrize(
    ("data", "whole"),
    [
        (b"", 0),
        (b"abc", 3),
        ("é".encode(), 2),
        ("é".encode()[:1], 0),
        (b"ab" + "€".encode()[:2], 2),
        (b"ab" + "€".encode()[:1], 2),
        ("a😀".encode()[:4], 1),
        ("a😀".encode(), 5),
        (b"\x80\x80\x80\x80\x80", 5),  # not UTF-8 at all: left to the replacement character
        (b"a\xff", 2),
    ],
)
def test_whole_characters_stops_before_a_split_character(data: bytes, whole: int) -> None:
    assert sse.whole_characters(data) == whole
