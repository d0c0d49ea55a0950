// The Durable Streams reference server (@durable-streams/server), in memory, for bench/append.py.
// Usage: node bench/ds_server.mjs <port>
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2] ?? 4437)
const server = new DurableStreamTestServer({ port, host: "127.0.0.1", compression: false })
await server.start()
console.log(`ready ${port}`)
process.on("SIGTERM", async () => {
  await server.stop()
  process.exit(0)
})
