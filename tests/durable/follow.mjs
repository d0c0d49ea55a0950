// Follows one Durable Streams JSON stream with the official TypeScript client until it closes
// (or an item of type "end" arrives), printing every item as one JSON line. A broken
// connection (the client surfaces it as an error) is resumed from the offset of the last
// batch delivered, as an application persisting its offset would.
// Usage: node follow.mjs <stream url> <long-poll|sse>
import { stream } from "@durable-streams/client"

const [url, live] = process.argv.slice(2)
let offset = "-1"
let failAttempt = null
process.on("unhandledRejection", (err) => failAttempt && failAttempt(err))
process.on("uncaughtException", (err) => failAttempt && failAttempt(err))

async function attempt() {
  const controller = new AbortController()
  try {
    const res = await stream({
      url,
      live,
      offset,
      json: true,
      signal: controller.signal,
      backoffOptions: { initialDelay: 20, maxDelay: 200 },
      onError: async () => ({}), // retry with the same options
    })
    return await new Promise((resolve, reject) => {
      failAttempt = reject
      res.subscribeJson(async (batch) => {
        let ended = false
        for (const item of batch.items) {
          process.stdout.write(JSON.stringify(item) + "\n")
          if (item && item.type === "end") ended = true
        }
        offset = batch.offset
        if (ended) resolve("end")
      })
      // The response can also end without the stream being closed (a dropped long-poll):
      // that is a reconnect, not the end.
      // The client may settle `closed` before it hands the last batch to subscribers.
      res.closed.then(
        () =>
          res.streamClosed
            ? setTimeout(() => resolve("closed"), 200)
            : reject(new Error("ended early")),
        reject
      )
    })
  } finally {
    failAttempt = null
    controller.abort()
  }
}

let reconnects = 0
for (;;) {
  try {
    await attempt()
    break
  } catch {
    reconnects++
    await new Promise((r) => setTimeout(r, 20))
  }
}
process.stdout.write(JSON.stringify({ follow: "done", offset, reconnects }) + "\n")
process.exit(0)
