// What the interop scripts share: their input, their output and a deadline.
//
// Input: one JSON object, as the first argument or (without one) on stdin.
// Output: JSON lines on stdout. `{"event": ...}` lines as things happen (pytest waits on them), then
// one last line, `{"result": {...}}` (exit 0) or `{"error": "...", ...}` (exit 1).
// Every HTTP request the script makes is recorded (method, URL, status) and reported with the result.

const requests = []
const realFetch = globalThis.fetch
globalThis.fetch = async (resource, init) => {
  const url = typeof resource === "string" ? resource : resource instanceof URL ? resource.href : resource.url
  const method = init?.method ?? (typeof resource === "object" && resource.method) ?? "GET"
  const entry = { method, url }
  requests.push(entry)
  try {
    const response = await realFetch(resource, init)
    entry.status = response.status
    const location = response.headers.get("location")
    if (location) entry.location = location
    return response
  } catch (error) {
    entry.failed = String(error?.name ?? error)
    throw error
  }
}

export async function input() {
  if (process.argv[2]) return JSON.parse(process.argv[2])
  let text = ""
  for await (const piece of process.stdin) text += piece
  return JSON.parse(text)
}

export function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n")
}

function requestLog() {
  // The first and the last ones are what a failure report needs; SSE reconnects can be many.
  return requests.length <= 60 ? requests : [...requests.slice(0, 30), { skipped: requests.length - 60 }, ...requests.slice(-30)]
}

export function finish(result) {
  process.stdout.write(JSON.stringify({ result: { ...result, requests: requestLog() } }) + "\n")
  process.exit(0)
}

export function fail(error, partial = {}) {
  process.stdout.write(
    JSON.stringify({ error: String(error?.stack ?? error), partial, requests: requestLog() }) + "\n"
  )
  process.exit(1)
}

// Runs `main(partial)`; fails with what `partial` holds so far when it throws or takes too long.
export async function run(main, timeoutMs = 30000) {
  const partial = {}
  const timer = setTimeout(() => fail(new Error(`timed out after ${timeoutMs} ms`), partial), timeoutMs)
  try {
    const result = await main(partial)
    clearTimeout(timer)
    finish(result)
  } catch (error) {
    fail(error, partial)
  }
}

// AI SDK UI message chunks summarised: what the tests assert on.
export function summariseUiChunks(chunks) {
  const count = (type) => chunks.filter((c) => c.type === type).length
  return {
    count: chunks.length,
    text: chunks.filter((c) => c.type === "text-delta").map((c) => c.delta).join(""),
    textDeltas: count("text-delta"),
    starts: count("start"),
    finishes: count("finish"),
    aborts: count("abort"),
    errors: chunks.filter((c) => c.type === "error"),
    messageIds: chunks.filter((c) => c.type === "start").map((c) => c.messageId),
    // The types in order, runs of one type folded: "start,text-start,text-delta*40,text-end,finish".
    shape: foldTypes(chunks.map((c) => c.type)),
    last: chunks.at(-1) ?? null,
  }
}

export function foldTypes(types) {
  const runs = []
  for (const type of types) {
    const top = runs.at(-1)
    if (top && top.type === type) top.n += 1
    else runs.push({ type, n: 1 })
  }
  return runs.map((r) => (r.n > 1 ? `${r.type}*${r.n}` : r.type)).join(",")
}

// TanStack AI: the conversation that a client builds from session-stream chunks, as
// @durable-streams/tanstack-ai-transport's own materializer does (MESSAGES_SNAPSHOT replaces,
// TEXT_MESSAGE_START creates by messageId, TEXT_MESSAGE_CONTENT appends `delta` to its message).
export function applyTanStackChunks(messages, chunks) {
  let out = messages.map((m) => ({ ...m, parts: [...(m.parts ?? [])] }))
  const find = (id, role) => {
    let index = out.findIndex((m) => m.id === id)
    if (index < 0) {
      out.push({ id, role: role === "tool" ? "assistant" : role, parts: [] })
      index = out.length - 1
    }
    return out[index]
  }
  for (const chunk of chunks) {
    if (chunk?.type === "MESSAGES_SNAPSHOT") {
      out = (chunk.messages ?? []).map((m) => ({ ...m, parts: [...(m.parts ?? [])] }))
    } else if (chunk?.type === "TEXT_MESSAGE_START" && typeof chunk.messageId === "string") {
      find(chunk.messageId, chunk.role)
    } else if (chunk?.type === "TEXT_MESSAGE_CONTENT" && typeof chunk.messageId === "string") {
      const message = find(chunk.messageId, "assistant")
      const delta = typeof chunk.delta === "string" ? chunk.delta : typeof chunk.content === "string" ? chunk.content : ""
      const index = message.parts.findLastIndex((p) => p.type === "text")
      if (index >= 0) message.parts[index] = { ...message.parts[index], content: tanstackText(message) + delta }
      else message.parts.push({ type: "text", content: delta })
    }
  }
  return out
}

export function tanstackText(message) {
  return (message?.parts ?? [])
    .filter((p) => p?.type === "text")
    .map((p) => (typeof p.content === "string" ? p.content : typeof p.text === "string" ? p.text : ""))
    .join("")
}

// A conversation reduced to what the tests compare: [{id, role, text}].
export function conversation(messages) {
  return messages.map((m) => ({ id: m.id, role: m.role, text: tanstackText(m) }))
}
