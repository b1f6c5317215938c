"""JSON mode (PROTOCOL.md section 9.1): validate bodies and split them into messages.

A message is stored as its own JSON text, exactly as the client sent it (minus surrounding
whitespace), so numbers of any size and precision survive the round trip: decoding into Python
values and encoding again would turn ``1e400`` into ``Infinity`` or ``1.0`` into ``1``.
"""

from __future__ import annotations

import json


class InvalidJSON(ValueError):
    """The body is not one valid JSON text."""


class TooManyMessages(ValueError):
    """The body holds more messages than the caller allows (found while parsing: the rest of the
    body is never decoded, so a huge array costs no more memory than the limit)."""


def _reject_constant(name: str) -> object:
    # NaN and Infinity are JavaScript, not JSON (RFC 8259); Python accepts them by default.
    raise InvalidJSON(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_WHITESPACE = " \t\n\r"


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def split_messages(body: bytes, limit: int | None = None) -> list[bytes]:
    """The messages a body holds: a top-level array is flattened one level.

    ``[]`` gives no messages (the caller decides whether that is allowed).
    Raises :class:`InvalidJSON`, and :class:`TooManyMessages` past ``limit`` messages.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON("body is not valid UTF-8") from exc
    if text.startswith("\ufeff"):
        raise InvalidJSON("byte order mark is not allowed")
    index = _skip(text, 0)
    if index == len(text):
        raise InvalidJSON("body is empty")
    try:
        if text[index] != "[":
            _, end = _decoder.raw_decode(text, index)
            if _skip(text, end) != len(text):
                raise InvalidJSON("unexpected data after JSON value")
            return [text[index:end].encode("utf-8")]
        messages: list[bytes] = []
        index = _skip(text, index + 1)
        if index < len(text) and text[index] == "]":
            index += 1
        else:
            while True:
                _, end = _decoder.raw_decode(text, index)
                messages.append(text[index:end].encode("utf-8"))
                if limit is not None and len(messages) > limit:
                    raise TooManyMessages(f"more than {limit} JSON messages in one request")
                index = _skip(text, end)
                if index >= len(text):
                    raise InvalidJSON("unterminated array")
                if text[index] == "]":
                    index += 1
                    break
                if text[index] != ",":
                    raise InvalidJSON("expected ',' or ']' in array")
                index = _skip(text, index + 1)
        if _skip(text, index) != len(text):
            raise InvalidJSON("unexpected data after JSON value")
        return messages
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"invalid JSON: {exc.msg} at position {exc.pos}") from exc
    except RecursionError as exc:
        raise InvalidJSON("JSON nested too deeply") from exc


def encode_message(value: object) -> bytes:
    """A Python value as one message's JSON text (compact, UTF-8)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def join_messages(messages: list[bytes]) -> bytes:
    """A read's body: the messages as one JSON array."""
    return b"[" + b",".join(messages) + b"]"
