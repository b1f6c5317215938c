// The Node reference server (@durable-streams/server, in-memory storage) for side-by-side runs.
// Usage: PORT=4500 node reference-server.mjs   (bench/run.py starts it)
import { DurableStreamTestServer } from "@durable-streams/server"

const server = new DurableStreamTestServer({
  port: Number(process.env.PORT ?? 4500),
  host: "127.0.0.1",
  longPollTimeout: Number(process.env.LONG_POLL_TIMEOUT_MS ?? 30000),
})
const url = await server.start()
console.log(`reference server listening on ${url}`)
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, async () => {
    await server.stop()
    process.exit(0)
  })
}
