// TanStack AI: one connection whose send and read may go to different processes: send(messages)
// to `sendUrl` (when messages are given), then subscribe to `readUrl` until RUN_FINISHED or
// RUN_ERROR.
//
// Input: {sendUrl, readUrl, messages?, initialOffset?, reportAfter?, timeoutMs?}
// Events: {"event":"subscribed"}; {"event":"progress","deltas":N} once, after `reportAfter` assistant
// TEXT_MESSAGE_CONTENT chunks; {"event":"chunk","type":T} for RUN_* chunks; {"event":"end","type":T}.
// Result: {ended, shape, runError, conversation}
import { durableStreamConnection } from "@durable-streams/tanstack-ai-transport"
import { applyTanStackChunks, conversation, emit, foldTypes, input, run } from "./lib.mjs"

const args = await input()

run(async (partial) => {
  const { sendUrl, readUrl, messages, initialOffset, reportAfter = 3 } = args
  const connection = durableStreamConnection({ sendUrl, readUrl, initialOffset })
  if (messages) await connection.send(messages, undefined)
  const chunks = []
  partial.chunks = chunks
  const userIds = new Set()
  let deltas = 0
  let ended = "subscription ended"
  emit("subscribed")
  for await (const chunk of connection.subscribe()) {
    chunks.push(chunk)
    if (chunk.type === "TEXT_MESSAGE_START" && chunk.role === "user") userIds.add(chunk.messageId)
    if (chunk.type === "TEXT_MESSAGE_CONTENT" && !userIds.has(chunk.messageId)) {
      deltas += 1
      if (deltas === reportAfter) emit("progress", { deltas })
    }
    if (chunk.type.startsWith("RUN_")) emit("chunk", { type: chunk.type })
    if (chunk.type === "RUN_FINISHED" || chunk.type === "RUN_ERROR") {
      ended = chunk.type
      break
    }
  }
  emit("end", { type: ended })
  return {
    ended,
    shape: foldTypes(chunks.map((c) => c.type)),
    runError: chunks.find((c) => c.type === "RUN_ERROR") ?? null,
    conversation: conversation(applyTanStackChunks([], chunks)),
  }
}, args.timeoutMs)
