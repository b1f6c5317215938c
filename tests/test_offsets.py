from __future__ import annotations

import random

import pytest

from durable_streams_asgi import offsets


def test_offsets_are_fixed_width_and_sort_like_positions() -> None:
    positions = [*sorted(random.sample(range(0, 10**12), 200)), offsets.MAX_POSITION]
    tokens = [offsets.encode_offset(p) for p in positions]
    assert {len(t) for t in tokens} == {offsets.OFFSET_WIDTH}
    assert tokens == sorted(tokens)
    assert [offsets.decode_offset(t) for t in tokens] == positions


def test_sentinels_are_never_minted() -> None:
    assert offsets.encode_offset(0) not in (offsets.BEGINNING, offsets.NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "0000000000000000",
        "0000000000000001_0000000000000000",  # reserved field must be zero
        "0000000000000000-0000000000000000",
        "0000000000000000_000000000000000x",
        "9999999999999999_9999999999999999",
        "-1",
        "now",
        "12",
        "000000000000001x",
        "0000000000000001 ",
        " 0000000000000001",
        "00000000000000001",
        "000000000000000/",
        "../0000000000000",
        "0000000000000,01",
        "\u0660" * 15 + "\u0661",  # non-ASCII digits
    ],
)
def test_decode_rejects_anything_not_minted(token: str) -> None:
    with pytest.raises(offsets.InvalidOffset):
        offsets.decode_offset(token)


def test_cursor_is_the_current_interval_without_an_echo() -> None:
    now = offsets.CURSOR_EPOCH_SECONDS + 20 * 1000 + 5
    assert offsets.next_cursor(None, now) == "1000"
    assert offsets.next_cursor("999", now) == "1000"  # an old cursor does not matter


@pytest.mark.parametrize("echo", ["1000", "1001", "5000"])
def test_cursor_moves_strictly_past_a_current_or_future_echo(echo: str) -> None:
    now = offsets.CURSOR_EPOCH_SECONDS + 20 * 1000 + 5
    for _ in range(50):
        cursor = int(offsets.next_cursor(echo, now))
        assert int(echo) < cursor <= int(echo) + 180


def test_cursor_ignores_garbage_echo() -> None:
    now = offsets.CURSOR_EPOCH_SECONDS + 20 * 7
    assert offsets.next_cursor("abc", now) == "7"
