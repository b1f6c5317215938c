// TanStack AI: a two-turn conversation over durableStreamConnection, with a refresh in the first.
//
// Turn 1: send([user1]) to BASE/api/tanstack/CHAT, subscribe(signal) to BASE/api/tanstack/CHAT/stream;
// after `abortAfter` assistant TEXT_MESSAGE_CONTENT chunks the subscription is aborted (the page
// goes away). Two reloaded pages then follow the rest of the answer until its RUN_FINISHED:
//   - "ssr": GET .../snapshot ({messages, offset}), then a new connection with initialOffset;
//   - "fresh": a new connection without an offset, which starts with a MESSAGES_SNAPSHOT.
// materializeSnapshotFromDurableStream({readUrl}) then gives the conversation and its offset.
// Turn 2: a connection with that offset as initialOffset sends [user1, assistant1, user2] and
// subscribes until the second RUN_FINISHED; materializeSnapshotFromDurableStream at the end.
//
// The reloaded pages, the materializing and turn 2 go to `reconnectBase` (default: `base`).
//
// Input: {base, reconnectBase?, chatId, turns: [{id, prompt}, {id, prompt}], abortAfter?, timeoutMs?}
// Result: {turn1: {...}, snapshotAfterTurn1, turn2: {...}, snapshot} (conversations as [{id, role, text}])
import { durableStreamConnection, materializeSnapshotFromDurableStream } from "@durable-streams/tanstack-ai-transport"
import { applyTanStackChunks, conversation, emit, foldTypes, input, run } from "./lib.mjs"

const args = await input()
const END = new Set(["RUN_FINISHED", "RUN_ERROR"])

function userMessage({ id, prompt }) {
  return { id, role: "user", parts: [{ type: "text", content: prompt }] }
}

// Reads a subscription until the end of the assistant run (or `stopAfter` assistant deltas).
async function follow(connection, chunks, { stopAfter = Infinity, signal } = {}) {
  const userIds = new Set()
  let deltas = 0
  for await (const chunk of connection.subscribe(signal)) {
    chunks.push(chunk)
    if (chunk.type === "TEXT_MESSAGE_START" && chunk.role === "user") userIds.add(chunk.messageId)
    if (chunk.type === "TEXT_MESSAGE_CONTENT" && !userIds.has(chunk.messageId)) deltas += 1
    if (END.has(chunk.type)) return { ended: chunk.type, deltas }
    if (deltas >= stopAfter) return { ended: null, deltas }
  }
  return { ended: "subscription ended", deltas }
}

function summary(chunks) {
  return {
    shape: foldTypes(chunks.map((c) => c.type)),
    runStarted: chunks.filter((c) => c.type === "RUN_STARTED").length,
    runFinished: chunks.filter((c) => c.type === "RUN_FINISHED").length,
    runErrors: chunks.filter((c) => c.type === "RUN_ERROR"),
    snapshots: chunks.filter((c) => c.type === "MESSAGES_SNAPSHOT").length,
  }
}

run(async (partial) => {
  const { base, chatId, turns, abortAfter = 3 } = args
  const sendUrl = `${base}/api/tanstack/${chatId}`
  const readUrl = `${sendUrl}/stream`
  // The same chat through the process the reloaded page reaches.
  const againUrl = `${args.reconnectBase ?? base}/api/tanstack/${chatId}`
  const againReadUrl = `${againUrl}/stream`

  // Turn 1, and the page goes away in the middle of the answer.
  const page = durableStreamConnection({ sendUrl, readUrl })
  await page.send([userMessage(turns[0])], undefined)
  const beforeChunks = []
  partial.beforeAbort = beforeChunks
  const controller = new AbortController()
  const before = await follow(page, beforeChunks, { stopAfter: abortAfter, signal: controller.signal })
  controller.abort()
  emit("aborted", { deltas: before.deltas })

  // Two reloaded pages follow the rest.
  const ssrResponse = await fetch(`${againUrl}/snapshot`)
  if (ssrResponse.status !== 200) throw new Error(`GET ${againUrl}/snapshot: ${ssrResponse.status} ${await ssrResponse.text()}`)
  const ssr = await ssrResponse.json()
  const ssrChunks = []
  const freshChunks = []
  partial.ssr = ssrChunks
  partial.fresh = freshChunks
  const [ssrEnd, freshEnd] = await Promise.all([
    follow(durableStreamConnection({ sendUrl: againUrl, readUrl: againReadUrl, initialOffset: ssr.offset }), ssrChunks),
    follow(durableStreamConnection({ sendUrl: againUrl, readUrl: againReadUrl }), freshChunks),
  ])
  const turn1 = {
    beforeAbort: { ...summary(beforeChunks), ...before, conversation: conversation(applyTanStackChunks([], beforeChunks)) },
    ssr: {
      offset: ssr.offset,
      snapshotMessages: conversation(ssr.messages),
      ...summary(ssrChunks),
      ended: ssrEnd.ended,
      conversation: conversation(applyTanStackChunks(ssr.messages, ssrChunks)),
    },
    fresh: {
      ...summary(freshChunks),
      ended: freshEnd.ended,
      conversation: conversation(applyTanStackChunks([], freshChunks)),
    },
  }
  partial.turn1 = turn1
  const afterTurn1 = await materializeSnapshotFromDurableStream({ readUrl: againReadUrl })
  emit("turn1", { messages: afterTurn1.messages.length })

  // Turn 2: the page's messages as TanStack's ChatClient sends them (the whole conversation).
  const history = afterTurn1.messages.map((m) => ({ id: m.id, role: m.role, parts: m.parts }))
  const next = durableStreamConnection({ sendUrl: againUrl, readUrl: againReadUrl, initialOffset: afterTurn1.offset })
  await next.send([...history, userMessage(turns[1])], undefined)
  const turn2Chunks = []
  partial.turn2 = turn2Chunks
  const turn2End = await follow(next, turn2Chunks)
  const final = await materializeSnapshotFromDurableStream({ readUrl: againReadUrl })
  return {
    turn1,
    snapshotAfterTurn1: { offset: afterTurn1.offset, conversation: conversation(afterTurn1.messages) },
    turn2: {
      ...summary(turn2Chunks),
      ended: turn2End.ended,
      conversation: conversation(applyTanStackChunks(afterTurn1.messages, turn2Chunks)),
    },
    snapshot: { offset: final.offset, conversation: conversation(final.messages) },
  }
}, args.timeoutMs)
