// Runs the official Durable Streams server conformance suite against DS_BASE_URL.
// Started by tests/durable/test_conformance.py (pytest) against a real `runstream serve`.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) {
  throw new Error("DS_BASE_URL is required (the server's root URL)")
}
runConformanceTests({ baseUrl, longPollTimeoutMs: Number(process.env.DS_LONG_POLL_MS ?? 20000) })
