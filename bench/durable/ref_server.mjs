// The Node reference Durable Streams server (@durable-streams/server, pinned in package.json),
// in memory or file-backed (a data directory given). Prints "ready" once it listens.
// Usage: node ref_server.mjs <port> [dataDir]
import { DurableStreamTestServer } from "@durable-streams/server"

const [port, dataDir] = process.argv.slice(2)
const server = new DurableStreamTestServer({
  port: Number(port),
  host: "127.0.0.1",
  ...(dataDir ? { dataDir } : {}),
})
await server.start()
console.log("ready")
const stop = async () => {
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
