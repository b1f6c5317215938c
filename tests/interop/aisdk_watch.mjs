// AI SDK: a page that opens while an answer is being written, on BASE (any process): useChat's
// resume, reconnectToStream({chatId}), read to the end of the stream.
//
// Input: {base, chatId, reportAfter?, timeoutMs?}
// Events: {"event":"attached"} when the stream is found; {"event":"progress","textDeltas":N} once,
// when `reportAfter` text-delta chunks have arrived; {"event":"chunk","type":T} for every chunk that
// is not text-start/-delta/-end; {"event":"end"} when the stream ends.
// Result: {reconnect: summary | null} (null: GET .../stream answered 204, nothing running).
import { createDurableChatTransport } from "@durable-streams/aisdk-transport"
import { emit, input, run, summariseUiChunks } from "./lib.mjs"

const args = await input()

run(async (partial) => {
  const { base, chatId, reportAfter = 3 } = args
  const transport = createDurableChatTransport({ api: `${base}/api/chat` })
  const stream = await transport.reconnectToStream({ chatId })
  if (stream === null) return { reconnect: null }
  emit("attached")
  const chunks = []
  partial.chunks = chunks
  let deltas = 0
  const reader = stream.getReader()
  for (;;) {
    const { done, value } = await reader.read()
    if (done) break
    chunks.push(value)
    if (value.type === "text-delta") {
      deltas += 1
      if (deltas === reportAfter) emit("progress", { textDeltas: deltas })
    } else if (!value.type.startsWith("text-")) {
      emit("chunk", { type: value.type })
    }
  }
  emit("end")
  return { reconnect: summariseUiChunks(chunks) }
}, args.timeoutMs)
