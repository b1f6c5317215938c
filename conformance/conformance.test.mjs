// Runs the upstream Durable Streams conformance suite, unfiltered, against a running server.
// The server is started by tests/test_conformance.py (or by hand) and named by CONFORMANCE_BASE_URL.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_BASE_URL
if (!baseUrl) {
  throw new Error("set CONFORMANCE_BASE_URL to the server's base URL, e.g. http://127.0.0.1:4437")
}

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS ?? "1000"),
  // The reserved subscription APIs (PROTOCOL.md sections 6 and 7); their webhook receivers listen
  // on 127.0.0.1, so the server runs with --allow-loopback-webhooks.
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS !== "0",
})
