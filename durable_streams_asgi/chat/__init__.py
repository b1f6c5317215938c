"""Durable AI chats: the server side of the official chat transports, on any number of workers.

- :class:`AISDKChat`: ``@durable-streams/aisdk-transport`` (``createDurableChatTransport``, what
  the AI SDK's ``useChat`` uses): a stream per answer, the conversation kept for reloads.
- :class:`TanStackChat`: ``@durable-streams/tanstack-ai-transport`` (``durableStreamConnection``):
  one session stream per chat holding the whole conversation.

Which answer is running for a chat is a lease in the storage, so any worker answers reconnects
and stops, and a worker that dies mid-answer has its answer ended by another
(:mod:`.runtime`).
"""

from __future__ import annotations

from .aisdk import AISDKChat, ChatTurn, ui_message_chunks
from .http import ChatError
from .runtime import ChatRuntime
from .tanstack import TanStackChat, TanStackTurn, apply_chunks, tanstack_chunks
from .uimessages import build_message

__all__ = [
    "AISDKChat",
    "ChatError",
    "ChatRuntime",
    "ChatTurn",
    "TanStackChat",
    "TanStackTurn",
    "apply_chunks",
    "build_message",
    "tanstack_chunks",
    "ui_message_chunks",
]
