// AI SDK: a page refresh in the middle of an answer, as useChat lives through it.
//
// sendMessages() posts the user message to BASE/api/chat and reads the answer's chunks; after
// `abortAfter` text-delta chunks the AbortController is aborted (the page goes away). A new
// transport (the reloaded page; on `reconnectBase` when given) then calls reconnectToStream({chatId})
// and reads the stream to its end, the chunks going through the AI SDK's readUIMessageStream as
// useChat would assemble them.
//
// Input: {base, reconnectBase?, chatId, messageId, prompt, abortAfter?, history?, timeoutMs?}
// Result: {beforeAbort: summary, abortedMidAnswer, reconnect: summary | null, message | null}
import { createDurableChatTransport } from "@durable-streams/aisdk-transport"
import { readUIMessageStream } from "ai"
import { emit, input, run, summariseUiChunks } from "./lib.mjs"

const args = await input()

run(async (partial) => {
  const { base, chatId, messageId, prompt, abortAfter = 3, history = [] } = args
  const messages = [...history, { id: messageId, role: "user", parts: [{ type: "text", text: prompt }] }]

  // The page before the refresh.
  const page = createDurableChatTransport({ api: `${base}/api/chat` })
  const controller = new AbortController()
  const stream = await page.sendMessages({
    trigger: "submit-message",
    chatId,
    messageId: undefined,
    messages,
    abortSignal: controller.signal,
  })
  const before = []
  partial.beforeAbort = before
  const reader = stream.getReader()
  let deltas = 0
  while (deltas < abortAfter) {
    const { done, value } = await reader.read()
    if (done) break
    before.push(value)
    if (value.type === "text-delta") deltas += 1
  }
  const abortedMidAnswer = deltas === abortAfter && !before.some((c) => c.type === "finish")
  controller.abort()
  await reader.cancel().catch(() => {})
  emit("aborted", { textDeltas: deltas })

  // The reloaded page.
  const reloaded = createDurableChatTransport({ api: `${args.reconnectBase ?? base}/api/chat` })
  const resumed = await reloaded.reconnectToStream({ chatId })
  if (resumed === null) return { beforeAbort: summariseUiChunks(before), abortedMidAnswer, reconnect: null, message: null }
  const [forChunks, forMessage] = resumed.tee()
  const chunks = []
  partial.reconnect = chunks
  const streamErrors = []
  const readChunks = (async () => {
    const r = forChunks.getReader()
    for (;;) {
      const { done, value } = await r.read()
      if (done) return
      chunks.push(value)
    }
  })()
  const assemble = (async () => {
    let last = null
    for await (const message of readUIMessageStream({ stream: forMessage, onError: (e) => streamErrors.push(String(e)) })) {
      last = message
    }
    return last
  })()
  const [, message] = await Promise.all([readChunks, assemble])
  return {
    beforeAbort: summariseUiChunks(before),
    abortedMidAnswer,
    reconnect: summariseUiChunks(chunks),
    message: message && {
      id: message.id,
      role: message.role,
      text: message.parts.filter((p) => p.type === "text").map((p) => p.text).join(""),
      parts: message.parts.map((p) => ({ type: p.type, state: p.state })),
    },
    streamErrors,
  }
}, args.timeoutMs)
