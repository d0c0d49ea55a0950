// Subscribe with npm `eventsource` and print what arrived, as one JSON line, once the
// server ends the stream for good (after the end event, a reconnect gets 204: CLOSED).
// Usage: node follow.mjs URL SECONDS
import { EventSource } from "eventsource";

const [url, seconds] = process.argv.slice(2);
const got = [];
let opens = 0;
let errors = 0;
let end = null;
const es = new EventSource(url);
es.addEventListener("open", () => {
  opens += 1;
  if (opens === 1) console.log(JSON.stringify({ open: true }));
});
es.addEventListener("error", () => {
  errors += 1;
});
es.addEventListener("tick", (e) => {
  got.push([e.lastEventId, JSON.parse(e.data).i]);
});
es.addEventListener("end", (e) => {
  end = [e.lastEventId, JSON.parse(e.data)];
});
const started = Date.now();
const timer = setInterval(() => {
  const closed = es.readyState === EventSource.CLOSED;
  if (closed || Date.now() - started > Number(seconds) * 1000) {
    clearInterval(timer);
    es.close();
    console.log(JSON.stringify({ done: true, closed, got, end, opens, errors }));
  }
}, 50);
