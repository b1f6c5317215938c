"""AI SDK UI messages: the chunks a model writes, folded into the message a client shows, and a
chat's history as records in a JSON stream.

The fold follows what the AI SDK's ``readUIMessageStream`` builds from a chunk stream for the
part types a chat shows: text, reasoning, step boundaries, sources, files, data parts and tool
calls; chunk types it does not know are skipped.

A chat's history stream holds two kinds of records, in order:

- ``{"turn": <generation path>, "keep": k, "messages": [...]}`` when a generation starts: the
  conversation is the first ``k`` messages of what it was, then ``messages`` (what the client
  sent that the history did not have: the new user message, or nothing for a regenerate);
- ``{"answer": <generation path>, "message": {...}}`` when that generation ended: its assistant
  message. Only the answer of the latest turn counts, once, so a late or repeated record (a stop
  racing the end) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


class MessageBuilder:
    """Builds one assistant UIMessage from UI message chunks."""

    def __init__(self, message_id: str) -> None:
        self.message: dict[str, Any] = {"id": message_id, "role": "assistant", "parts": []}
        self._open: dict[tuple[str, str], dict[str, Any]] = {}
        self._tools: dict[str, dict[str, Any]] = {}

    @property
    def parts(self) -> list[dict[str, Any]]:
        return self.message["parts"]

    def _metadata(self, chunk: dict[str, Any]) -> None:
        metadata = chunk.get("messageMetadata")
        if isinstance(metadata, dict):
            self.message["metadata"] = {**self.message.get("metadata", {}), **metadata}

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("type"), str):
            return
        kind: str = chunk["type"]
        if kind in ("start", "finish", "message-metadata"):
            if kind == "start" and isinstance(chunk.get("messageId"), str):
                self.message["id"] = chunk["messageId"]
            self._metadata(chunk)
        elif kind == "start-step":
            self.parts.append({"type": "step-start"})
        elif kind in ("text-start", "reasoning-start"):
            part = {"type": kind.split("-")[0], "text": "", "state": "streaming"}
            self._open[(part["type"], str(chunk.get("id")))] = part
            self.parts.append(part)
        elif kind in ("text-delta", "reasoning-delta"):
            key = (kind.split("-")[0], str(chunk.get("id")))
            part = self._open.get(key)
            if part is None:  # a delta without its start: open the part here
                part = {"type": key[0], "text": "", "state": "streaming"}
                self._open[key] = part
                self.parts.append(part)
            part["text"] += _text_of(chunk.get("delta"))
        elif kind in ("text-end", "reasoning-end"):
            part = self._open.pop((kind.split("-")[0], str(chunk.get("id"))), None)
            if part is not None:
                part["state"] = "done"
        elif kind in ("source-url", "source-document", "file") or kind.startswith("data-"):
            part = {k: v for k, v in chunk.items() if k not in ("transient",)}
            if kind.startswith("data-") and chunk.get("transient"):
                return
            if kind.startswith("data-") and chunk.get("id") is not None:
                for existing in self.parts:
                    if existing.get("type") == kind and existing.get("id") == chunk.get("id"):
                        existing["data"] = chunk.get("data")
                        return
            self.parts.append(part)
        elif kind in ("tool-input-start", "tool-input-available"):
            self._tool(chunk, "input-streaming" if kind == "tool-input-start" else "input-available")
        elif kind in ("tool-output-available", "tool-output-error", "tool-input-error"):
            tool = self._tools.get(str(chunk.get("toolCallId")))
            if tool is not None:
                if kind == "tool-output-available":
                    tool.update(state="output-available", output=chunk.get("output"))
                else:
                    tool.update(state="output-error", errorText=_text_of(chunk.get("errorText")))

    def _tool(self, chunk: dict[str, Any], state: str) -> None:
        call_id = str(chunk.get("toolCallId"))
        tool = self._tools.get(call_id)
        if tool is None:
            name = chunk.get("toolName")
            kind = "dynamic-tool" if chunk.get("dynamic") else f"tool-{name}"
            tool = {"type": kind, "toolCallId": call_id}
            if chunk.get("dynamic"):
                tool["toolName"] = name
            self._tools[call_id] = tool
            self.parts.append(tool)
        tool["state"] = state
        if "input" in chunk:
            tool["input"] = chunk["input"]

    def done(self) -> dict[str, Any]:
        """The message, with parts still streaming (a stopped or failed answer) marked done."""
        for part in self._open.values():
            part["state"] = "done"
        self._open.clear()
        return self.message


def build_message(message_id: str, chunks: Iterable[Any]) -> dict[str, Any]:
    builder = MessageBuilder(message_id)
    for chunk in chunks:
        builder.add(chunk)
    return builder.done()


class History:
    """A chat's conversation, folded from its history records."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        #: The generation of the latest turn, and whether its answer is in ``messages``.
        self.turn: str | None = None
        self.answered = False
        #: Where the history stream was read up to: follow it from here to learn of changes.
        self.offset = "-1"

    def apply(self, record: Any) -> None:
        if not isinstance(record, dict):
            return
        if isinstance(record.get("turn"), str):
            keep = record.get("keep")
            keep = keep if isinstance(keep, int) and 0 <= keep <= len(self.messages) else len(self.messages)
            added = record.get("messages")
            self.messages = self.messages[:keep] + (added if isinstance(added, list) else [])
            self.turn, self.answered = record["turn"], False
        elif record.get("answer") == self.turn and self.turn is not None and not self.answered:
            message = record.get("message")
            if isinstance(message, dict):
                self.messages.append(message)
                self.answered = True

    def common_prefix(self, sent: list[dict[str, Any]]) -> int:
        """How many leading messages of ``sent`` the history has already, by id (a client that
        regenerates or edits sends a shorter or different tail)."""
        count = 0
        for ours, theirs in zip(self.messages, sent, strict=False):
            if not isinstance(theirs.get("id"), str) or ours.get("id") != theirs.get("id"):
                break
            count += 1
        return count
