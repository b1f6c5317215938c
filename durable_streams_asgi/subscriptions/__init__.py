"""Subscriptions (PROTOCOL.md sections 6 and 7): wake an application when any of many streams
gets data, by webhook or through a wake stream (pull-wake), with leases, fencing and cursors kept
in the storage so that every process shares them and they survive restarts.

:class:`Subscriptions` is the in-process API; :mod:`.routes` serves it at ``{root}/__ds/...``.
"""

from __future__ import annotations

from .manager import Subscriptions
from .model import Config, State, SubscriptionError, parse_config

__all__ = ["Config", "State", "SubscriptionError", "Subscriptions", "parse_config"]
