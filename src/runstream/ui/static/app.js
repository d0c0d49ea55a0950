// runstream web UI: a runs list that updates live and a run page with its live log.
// No build step, no dependencies. The log view is virtualised: only the rows in view
// (plus a small overscan) are in the DOM, so 100,000-line logs stay responsive.
"use strict";

(function () {
  const ROW_H = 18;
  const OVERSCAN = 30;
  const LIST_POLL_MS = 1500;
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_CAP_MS = 5000;
  const WS_FAILURES_BEFORE_POLLING = 3;
  const POLL_WAIT_S = 20;
  const POLLS_BEFORE_RETRYING_WS = 5;
  const FINAL = new Set(["succeeded", "failed", "cancelled", "timed_out", "lost"]);

  const $ = (id) => document.getElementById(id);

  // ---------- auth + HTTP ----------
  // A token given as ?token= is kept in localStorage and taken out of the address bar at
  // once, so it does not stay in the history, bookmarks or a shared screenshot. It is
  // then only ever sent in headers: Authorization for fetch, a subprotocol for WebSocket.
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    if (params.get("token")) localStorage.setItem("runstream.token", params.get("token"));
    params.delete("token");
    const query = params.toString();
    history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }
  const token = localStorage.getItem("runstream.token") || "";
  // The WebSocket subprotocols: "runstream", plus the token as runstream.bearer.<base64url>.
  const wsProtocols = ["runstream"];
  if (token) {
    const bytes = new TextEncoder().encode(token);
    let bin = "";
    for (const b of bytes) bin += String.fromCharCode(b);
    wsProtocols.push("runstream.bearer." + btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, ""));
  }

  async function api(path, opts = {}) {
    const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    if (token) headers.Authorization = "Bearer " + token;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, Object.assign({}, opts, { headers }));
    let body = null;
    const text = await res.text();
    if (text) { try { body = JSON.parse(text); } catch (e) { body = { raw: text }; } }
    if (!res.ok) {
      const err = new Error((body && body.error && body.error.message) || res.statusText);
      err.status = res.status; err.body = body;
      throw err;
    }
    return body;
  }

  function setConn(text, cls) {
    const el = $("conn");
    el.textContent = text;
    el.className = "conn " + (cls || "");
  }

  // ---------- time helpers ----------
  const fmtTime = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "");
  function fmtDuration(run) {
    if (!run.started_at) return "";
    const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
    let s = Math.max(0, (end - Date.parse(run.started_at)) / 1000);
    if (s < 60) return s.toFixed(1) + "s";
    const m = Math.floor(s / 60); s = Math.floor(s % 60);
    if (m < 60) return m + "m" + String(s).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
  }
  const esc = (s) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

  // ---------- ANSI SGR -> HTML ----------
  const BASIC = ["#3b3f4a", "#f85149", "#3fb950", "#d29922", "#58a6ff", "#bc8cff", "#39c5cf", "#d7dae0"];
  const BRIGHT = ["#6e7681", "#ff7b72", "#56d364", "#e3b341", "#79c0ff", "#d2a8ff", "#56d4dd", "#ffffff"];
  function color256(n) {
    if (n < 8) return BASIC[n];
    if (n < 16) return BRIGHT[n - 8];
    if (n < 232) {
      n -= 16;
      const v = (x) => (x === 0 ? 0 : 55 + x * 40);
      return `rgb(${v(Math.floor(n / 36))},${v(Math.floor(n / 6) % 6)},${v(n % 6)})`;
    }
    const g = 8 + (n - 232) * 10;
    return `rgb(${g},${g},${g})`;
  }
  // eslint-disable-next-line no-control-regex
  const CSI = /\x1b\[([0-9;?]*)([A-Za-z])/g;
  // eslint-disable-next-line no-control-regex
  const OTHER_ESC = /\x1b(?:\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])/g;
  function stripAnsi(s) { return s.replace(CSI, "").replace(OTHER_ESC, ""); }
  function ansiToHtml(s) {
    if (s.indexOf("\x1b") < 0) return esc(s);
    s = s.replace(OTHER_ESC, "");
    let out = "", last = 0, st = {}, m;
    CSI.lastIndex = 0;
    const flush = (text) => {
      if (!text) return;
      const cls = [];
      if (st.b) cls.push("a-b"); if (st.d) cls.push("a-d"); if (st.i) cls.push("a-i"); if (st.u) cls.push("a-u");
      let fg = st.fg, bg = st.bg;
      if (st.inv) { const t = fg; fg = bg || "#0b0d10"; bg = t || "#d7dae0"; }
      // Colours go in data attributes and are applied through the CSSOM (paintColours):
      // the page's Content-Security-Policy refuses inline style attributes.
      const attrs = (fg ? ` data-fg="${fg}"` : "") + (bg ? ` data-bg="${bg}"` : "");
      if (cls.length || attrs) {
        out += `<span class="${cls.join(" ")}"${attrs}>${esc(text)}</span>`;
      } else out += esc(text);
    };
    while ((m = CSI.exec(s)) !== null) {
      flush(s.slice(last, m.index));
      last = CSI.lastIndex;
      if (m[2] !== "m") continue; // cursor movement etc.: dropped
      const codes = m[1] === "" ? [0] : m[1].split(";").map((x) => parseInt(x, 10) || 0);
      for (let i = 0; i < codes.length; i++) {
        const c = codes[i];
        if (c === 0) st = {};
        else if (c === 1) st.b = true; else if (c === 2) st.d = true; else if (c === 3) st.i = true;
        else if (c === 4) st.u = true; else if (c === 7) st.inv = true;
        else if (c === 22) { st.b = false; st.d = false; } else if (c === 23) st.i = false;
        else if (c === 24) st.u = false; else if (c === 27) st.inv = false;
        else if (c >= 30 && c <= 37) st.fg = BASIC[c - 30]; else if (c === 39) st.fg = null;
        else if (c >= 40 && c <= 47) st.bg = BASIC[c - 40]; else if (c === 49) st.bg = null;
        else if (c >= 90 && c <= 97) st.fg = BRIGHT[c - 90]; else if (c >= 100 && c <= 107) st.bg = BRIGHT[c - 100];
        else if ((c === 38 || c === 48) && codes[i + 1] === 5) { st[c === 38 ? "fg" : "bg"] = color256(codes[i + 2] || 0); i += 2; }
        else if ((c === 38 || c === 48) && codes[i + 1] === 2) {
          st[c === 38 ? "fg" : "bg"] = `rgb(${codes[i + 2] || 0},${codes[i + 3] || 0},${codes[i + 4] || 0})`; i += 4;
        }
      }

    }
    flush(s.slice(last));
    return out;
  }

  // ---------- runs list ----------
  let listTimer = null;
  let tasksLoaded = false;
  async function loadTasks() {
    if (tasksLoaded) return;
    try {
      const body = await api("v1/tasks");
      const tasks = (body && (body.tasks || body)) || [];
      const sel = $("f-task");
      for (const t of tasks) {
        const name = typeof t === "string" ? t : t.name;
        const o = document.createElement("option");
        o.textContent = name; sel.appendChild(o);
      }
      tasksLoaded = true;
    } catch (e) { /* the list still works without the task filter */ }
  }
  async function refreshList() {
    const q = new URLSearchParams({ limit: "200" });
    if ($("f-status").value) q.set("status", $("f-status").value);
    if ($("f-task").value) q.set("task", $("f-task").value);
    try {
      const body = await api("v1/runs?" + q);
      const runs = (body && (body.runs || body.items)) || [];
      const text = $("f-text").value.trim().toLowerCase();
      const shown = runs.filter((r) => !text || r.id.toLowerCase().includes(text) || r.task.toLowerCase().includes(text));
      $("runs-body").innerHTML = shown.map((r) =>
        `<tr data-run="${esc(r.id)}"><td class="mono"><a href="#/runs/${encodeURIComponent(r.id)}">${esc(r.id)}</a></td>` +
        `<td>${esc(r.task)}</td><td><span class="badge s-${esc(r.status)}">${esc(r.status)}</span>` +
        (r.waiting ? `<span class="waiting" title="waiting for resources">${esc(r.waiting)}</span>` : "") + `</td>` +
        `<td>${fmtTime(r.started_at || r.created_at)}</td><td>${fmtDuration(r)}</td>` +
        `<td>${r.exit_code === null || r.exit_code === undefined ? "" : r.exit_code}</td></tr>`).join("");
      $("runs-empty").hidden = runs.length > 0;
      $("list-count").textContent = `${shown.length} of ${runs.length}`;
      setConn("live", "live");
    } catch (e) {
      setConn("server unreachable — retrying", "down");
    }
  }
  function showList() {
    $("run-view").hidden = true; $("list-view").hidden = false;
    document.title = "runstream";
    loadTasks();
    refreshList();
    clearInterval(listTimer);
    listTimer = setInterval(refreshList, LIST_POLL_MS);
  }
  for (const id of ["f-status", "f-task"]) $(id).addEventListener("change", refreshList);
  $("f-text").addEventListener("input", refreshList);

  // ---------- run page: log model ----------
  class LogModel {
    constructor() { this.reset(); }
    reset() {
      this.lines = [];            // {n, t, stream, raw, plain, html}
      this.open = {};             // stream -> index of a line still being continued (partial)
      this.cr = {};               // stream -> index of the line a bare CR will overwrite
    }
    add(stream, data, time, cls) {
      const text = typeof data.line === "string" ? data.line : "";
      let idx = this.open[stream];
      if (idx === undefined) idx = this.cr[stream];
      if (idx !== undefined) {
        const ln = this.lines[idx];
        ln.raw = this.open[stream] !== undefined ? ln.raw + text : text;
        ln.plain = stripAnsi(ln.raw); ln.html = null; ln.t = time;
      } else {
        idx = this.lines.length;
        this.lines.push({ n: idx + 1, t: time, stream, raw: text, plain: stripAnsi(text), html: null, cls: cls || "" });
      }
      delete this.open[stream]; delete this.cr[stream];
      if (data.partial) this.open[stream] = idx;
      else if (data.cr) this.cr[stream] = idx;
      return idx;
    }
    meta(text, time) {
      this.open = {}; this.cr = {};
      this.lines.push({ n: this.lines.length + 1, t: time, stream: "meta", raw: text, plain: text, html: null, cls: "meta" });
    }
    rawText() {
      return this.lines.filter((l) => l.stream !== "meta").map((l) => l.raw).join("\n") + "\n";
    }
  }

  const model = new LogModel();
  const view = { runId: null, epoch: null, lastId: 0, status: null, ended: false, ws: null, gen: 0,
                 matches: [], cur: -1, dirty: false, programmaticScroll: false, mode: "ws" };
  window.__runstream = {   // read by the browser tests; also handy in the devtools console
    logText: () => model.rawText(),
    lines: () => model.lines.map((l) => ({ stream: l.stream, text: l.raw })),
    status: () => view.status,
    lastId: () => view.lastId,
    mode: () => view.mode,
    ended: () => view.ended,
  };

  function schedule() {
    if (view.dirty) return;
    view.dirty = true;
    requestAnimationFrame(render);
  }
  function paintColours(root) {
    for (const el of root.querySelectorAll("[data-fg],[data-bg]")) {
      if (el.dataset.fg) el.style.color = el.dataset.fg;
      if (el.dataset.bg) el.style.background = el.dataset.bg;
    }
  }
  function render() {
    view.dirty = false;
    const box = $("log");
    const total = model.lines.length;
    $("log-spacer").style.height = total * ROW_H + "px";
    if ($("follow-tail").checked) {
      view.programmaticScroll = true;
      box.scrollTop = box.scrollHeight;
    }
    const first = Math.max(0, Math.floor(box.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(total, Math.ceil((box.scrollTop + box.clientHeight) / ROW_H) + OVERSCAN);
    const hits = new Set(view.matches);
    const curIdx = view.cur >= 0 ? view.matches[view.cur] : -1;
    let html = "";
    for (let i = first; i < last; i++) {
      const l = model.lines[i];
      if (l.html === null) l.html = ansiToHtml(l.raw);
      const cls = ["row", l.stream === "stderr" ? "err" : "", l.cls, hits.has(i) ? "hit" : "", i === curIdx ? "cur" : ""].join(" ");
      html += `<div class="${cls}" data-n="${l.n}"><span class="n">${l.n}</span><span class="t">${fmtTime(l.t)}</span><span class="txt">${l.html}</span></div>`;
    }
    const rows = $("log-rows");
    rows.style.transform = `translateY(${first * ROW_H}px)`;
    rows.innerHTML = html;
    paintColours(rows);
    $("log-count").textContent = `${total} lines`;
  }
  $("log").addEventListener("scroll", () => {
    const box = $("log");
    if (view.programmaticScroll) { view.programmaticScroll = false; schedule(); return; }
    // Scroll lock: scrolling up stops following the tail; reaching the bottom resumes it.
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - ROW_H;
    $("follow-tail").checked = atBottom;
    schedule();
  });
  $("follow-tail").addEventListener("change", schedule);
  $("show-time").addEventListener("change", () => $("log").classList.toggle("hide-time", !$("show-time").checked));

  // ---------- search ----------
  function runSearch() {
    const q = $("log-search").value.toLowerCase();
    view.matches = [];
    if (q) model.lines.forEach((l, i) => { if (l.plain.toLowerCase().includes(q)) view.matches.push(i); });
    view.cur = Math.min(view.cur, view.matches.length - 1);
    $("search-info").textContent = q ? `${view.matches.length} matches` : "";
    schedule();
  }
  function jump(delta) {
    if (!view.matches.length) return;
    view.cur = (view.cur + delta + view.matches.length) % view.matches.length;
    $("follow-tail").checked = false;
    const box = $("log");
    view.programmaticScroll = true;
    box.scrollTop = Math.max(0, view.matches[view.cur] * ROW_H - box.clientHeight / 2);
    $("search-info").textContent = `${view.cur + 1} / ${view.matches.length}`;
    schedule();
  }
  let searchTimer = null;
  $("log-search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(runSearch, 150); });
  $("log-search").addEventListener("keydown", (e) => { if (e.key === "Enter") jump(e.shiftKey ? -1 : 1); });
  $("search-next").addEventListener("click", () => jump(1));
  $("search-prev").addEventListener("click", () => jump(-1));

  // ---------- download + cancel ----------
  $("btn-download").addEventListener("click", () => {
    const blob = new Blob([model.rawText()], { type: "text/plain;charset=utf-8" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = (view.runId || "run") + ".log";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });
  $("btn-cancel").addEventListener("click", async () => {
    $("btn-cancel").disabled = true;
    try { await api(`v1/runs/${encodeURIComponent(view.runId)}/cancel`, { method: "POST", body: "{}" }); }
    catch (e) { $("btn-cancel").disabled = false; alert("cancel failed: " + e.message); }
  });

  // ---------- delete (with a confirmation dialog) ----------
  $("btn-delete").addEventListener("click", () => {
    const live = !FINAL.has(view.status || "");
    $("delete-title").textContent = `Delete run ${view.runId}?`;
    $("delete-text").textContent = "The run and its whole log are removed. This cannot be undone." +
      (live ? ` It is ${view.status}: it will be cancelled first.` : "");
    $("delete-error").hidden = true;
    $("delete-confirm").disabled = false;
    $("delete-dialog").showModal();
  });
  $("delete-confirm").addEventListener("click", async () => {
    $("delete-confirm").disabled = true;
    const force = FINAL.has(view.status || "") ? "" : "?force=1";
    try {
      await api(`v1/runs/${encodeURIComponent(view.runId)}${force}`, { method: "DELETE" });
      $("delete-dialog").close();
      view.gen++; // stop following the run that no longer exists
      location.hash = "#/";
    } catch (e) {
      $("delete-error").textContent = "delete failed: " + e.message;
      $("delete-error").hidden = false;
      $("delete-confirm").disabled = false;
    }
  });

  // ---------- run page: applying events ----------
  let waitTimer = null;
  function setStatus(status) {
    if (!status) return;
    view.status = status;
    const b = $("run-status");
    b.textContent = status; b.className = "badge s-" + status;
    $("btn-cancel").disabled = FINAL.has(status);
    // A queued run may be held by a resource gate: look at its record until it starts.
    clearInterval(waitTimer);
    if (status === "queued") waitTimer = setInterval(refreshRun, LIST_POLL_MS);
    else $("run-waiting").hidden = true;
  }
  function apply(ev) {
    // Exactly-once view: the server resumes from our last id; anything at or below it is a repeat.
    if (typeof ev.id === "number") {
      if (ev.id <= view.lastId) return;
      view.lastId = ev.id;
    }
    const d = ev.data;
    switch (ev.type) {
      case "stdout": case "stderr":
        model.add(ev.type, d && typeof d === "object" ? d : { line: String(d) }, ev.time); break;
      case "status":
        if (d && d.status) setStatus(d.status);
        model.meta(`status: ${d && d.status}` + (d && d.exit_code !== undefined && d.exit_code !== null ? ` (exit ${d.exit_code})` : ""), ev.time);
        break;
      case "progress": {
        const p = d || {};
        $("progress").hidden = false;
        if (p.total) $("progress-fill").style.width = Math.min(100, (100 * (p.current || 0)) / p.total) + "%";
        $("progress-text").textContent = [p.current !== undefined ? p.current : "", p.total ? "/ " + p.total : "", p.message || ""].join(" ");
        break;
      }
      case "log":
        model.add("stdout", { line: `[${(d && d.level) || "info"}] ${(d && (d.message || d.msg)) || ""}` }, ev.time); break;
      case "end":
        view.ended = true;
        if (d && d.status) setStatus(d.status);
        model.meta(`end: ${(d && d.status) || "closed"}` + (d && d.reason ? ` — ${d.reason}` : ""), ev.time);
        setConn("ended", "");
        break;
      default:
        model.meta(`${ev.type}: ${JSON.stringify(d)}`, ev.time);
    }
    schedule();
    if ($("log-search").value) { clearTimeout(searchTimer); searchTimer = setTimeout(runSearch, 300); }
  }
  function applyReset(r) {
    // History this page showed is no longer the server's: say so, and restart from the new position.
    if (r.reason === "epoch_changed") { model.reset(); view.matches = []; }
    model.meta(`history reset (${r.reason}); continuing after id ${r.after}`, null);
    view.epoch = r.epoch;
    view.lastId = r.after;
    schedule();
  }

  // ---------- run page: connection (WebSocket, exact resume, long-poll fallback) ----------
  function position() { return view.epoch ? `${view.epoch}:${view.lastId}` : String(view.lastId); }
  function backoff(attempt) { return Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt); }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function wsOnce(gen) {
    return new Promise((resolve) => {
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const base = new URL(`v1/runs/${encodeURIComponent(view.runId)}/ws`, location.href);
      base.protocol = proto;
      base.searchParams.set("after", position());
      let opened = false, gotEvent = false;
      const ws = new WebSocket(base, wsProtocols);
      view.ws = ws;
      ws.onopen = () => { opened = true; setConn("live", "live"); };
      ws.onmessage = (m) => {
        if (gen !== view.gen) return;
        let msg;
        try { msg = JSON.parse(m.data); } catch (e) { return; } // malformed: skip, keep the connection
        if (msg.id === undefined && msg.type === "ping") return; // heartbeat: only a sign of life
        if (msg.type === "reset") applyReset(msg.data || msg);
        else { gotEvent = true; apply(msg); }
      };
      ws.onclose = () => resolve({ opened, gotEvent });
      ws.onerror = () => { /* onclose follows */ };
    });
  }

  async function pollOnce(gen) {
    const q = new URLSearchParams({ after: position(), limit: "1000", wait: String(POLL_WAIT_S) });
    try {
      const page = await api(`v1/runs/${encodeURIComponent(view.runId)}/events?` + q);
      if (gen !== view.gen) return { ok: true };
      setConn("live (polling)", "live");
      view.epoch = page.epoch;
      for (const ev of page.events) apply(ev);
      if (page.closed) view.ended = true;
      return { ok: true, got: page.events.length > 0 };
    } catch (e) {
      if (e.status === 410 && e.body && e.body.error) {
        const er = e.body.error;
        applyReset({ reason: er.reason || "epoch_changed", epoch: er.epoch, after: (er.first_id || 1) - 1 });
        return { ok: true };
      }
      if (e.status === 404) return { ok: false, fatal: true };
      return { ok: false };
    }
  }

  async function follow(gen) {
    let attempt = 0, wsFailures = 0, polls = 0;
    while (gen === view.gen && !view.ended) {
      if (view.mode === "ws") {
        const r = await wsOnce(gen);
        if (gen !== view.gen || view.ended) break;
        if (r.gotEvent) attempt = 0; // reset the backoff only after a real event, not on connect
        wsFailures = r.opened ? 0 : wsFailures + 1;
        if (wsFailures >= WS_FAILURES_BEFORE_POLLING) { view.mode = "poll"; polls = 0; }
      } else {
        const r = await pollOnce(gen);
        if (gen !== view.gen || view.ended) break;
        if (r.fatal) { setConn("run not found", "down"); return; }
        if (r.ok) { attempt = 0; polls++; if (polls >= POLLS_BEFORE_RETRYING_WS) { view.mode = "ws"; wsFailures = 0; } continue; }
      }
      setConn("reconnecting…", "down");
      await sleep(backoff(attempt++));
      if (view.status === null) refreshRun();
    }
    if (view.ended) setConn("ended", "");
  }

  async function refreshRun() {
    try {
      const run = await api(`v1/runs/${encodeURIComponent(view.runId)}`);
      setStatus(run.status);
      $("run-meta").textContent = `${run.task} · attempt ${run.attempt || 1}` + (run.worker ? ` · ${run.worker}` : "");
      $("run-waiting").textContent = run.waiting ? `waiting for resources: ${run.waiting}` : "";
      $("run-waiting").hidden = !run.waiting;
      return true;
    } catch (e) { return false; }
  }

  async function showRun(id) {
    clearInterval(listTimer);
    clearInterval(waitTimer);
    $("list-view").hidden = true; $("run-view").hidden = false;
    view.gen++;
    if (view.ws) { try { view.ws.close(); } catch (e) { /* already closed */ } }
    Object.assign(view, { runId: id, epoch: null, lastId: 0, status: null, ended: false, matches: [], cur: -1, mode: "ws" });
    model.reset();
    $("progress").hidden = true;
    $("run-title").textContent = id;
    document.title = id + " — runstream";
    $("follow-tail").checked = true;
    schedule();
    await refreshRun();
    try { view.epoch = (await api(`v1/streams/${encodeURIComponent(id)}`)).epoch; } catch (e) { /* learnt later */ }
    follow(view.gen);
  }

  // ---------- router ----------
  function route() {
    const m = location.hash.match(/^#\/runs\/(.+)$/);
    if (m) showRun(decodeURIComponent(m[1])); else { view.gen++; clearInterval(waitTimer); showList(); }
  }
  window.addEventListener("hashchange", route);
  route();
})();
