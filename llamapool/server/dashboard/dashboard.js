// llamapool dashboard: reads GET /api/v1/state/stream and renders each snapshot.
//
// EventSource cannot send an Authorization header, so the stream is read with fetch() and
// parsed here. Every value that comes from the pool (worker names, models, errors, versions)
// reaches the page through textContent or an attribute, never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "llamapool.apiKey";
  const STREAM_URL = new URL("../api/v1/state/stream", document.baseURI);
  /** Reconnect backoff, in milliseconds: doubles from the first to the cap, with jitter. */
  const BACKOFF_FIRST = 500;
  const BACKOFF_CAP = 15000;
  /** The server sends a keep-alive at least every 15 s; silence this long means a dead link. */
  const STALL_MS = 45000;

  // --- Server-Sent Events ------------------------------------------------------------------

  /**
   * An incremental parser of the text/event-stream format (the WHATWG algorithm): feed it
   * decoded text as it arrives, in pieces of any size; it calls onEvent({type, data, id}) for
   * each complete event and onComment(text) for each comment line.
   */
  class SSEParser {
    constructor(onEvent, onComment = () => {}) {
      this.onEvent = onEvent;
      this.onComment = onComment;
      this.buffer = "";
      this.skipLF = false;
      this.data = [];
      this.type = "";
      this.lastEventId = "";
      this.retry = null;
    }

    push(text) {
      let buf = this.buffer + text;
      let pos = 0;
      if (this.skipLF && buf.startsWith("\n")) pos = 1;
      this.skipLF = false;
      const eol = /[\r\n]/g;
      for (;;) {
        eol.lastIndex = pos;
        const match = eol.exec(buf);
        if (match === null) break;
        const end = match.index;
        const line = buf.slice(pos, end);
        if (buf[end] === "\r") {
          if (end + 1 === buf.length) this.skipLF = true; // a "\n" may open the next piece
          pos = buf[end + 1] === "\n" ? end + 2 : end + 1;
        } else {
          pos = end + 1;
        }
        this.line(line);
      }
      this.buffer = buf.slice(pos);
    }

    line(line) {
      if (line === "") {
        this.dispatch();
        return;
      }
      if (line.startsWith(":")) {
        this.onComment(line.slice(1));
        return;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      switch (field) {
        case "data":
          this.data.push(value);
          break;
        case "event":
          this.type = value;
          break;
        case "id":
          if (!value.includes("\0")) this.lastEventId = value;
          break;
        case "retry":
          if (/^\d+$/.test(value)) this.retry = Number(value);
          break;
        default: // unknown fields are ignored
      }
    }

    dispatch() {
      const data = this.data;
      const type = this.type || "message";
      this.data = [];
      this.type = "";
      if (data.length === 0) return;
      this.onEvent({ type, data: data.join("\n"), id: this.lastEventId });
    }
  }

  // --- formatting ----------------------------------------------------------------------------

  const integer = new Intl.NumberFormat();
  const compact = new Intl.NumberFormat(undefined, {
    notation: "compact",
    maximumFractionDigits: 1,
  });

  const fmtInt = (n) => integer.format(Number(n) || 0);
  const fmtCompact = (n) => compact.format(Number(n) || 0);

  function fmtDuration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function fmtAgo(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 120) return `${s}s ago`;
    if (s < 7200) return `${Math.floor(s / 60)}m ago`;
    return `${Math.floor(s / 3600)}h ago`;
  }

  // --- DOM helpers ---------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setTitle(node, text) {
    if (node.title !== text) node.title = text;
  }

  const field = (name, root = document) => root.querySelector(`[data-field="${name}"]`);

  // --- rendering -----------------------------------------------------------------------------

  /** The latest snapshot and when it arrived, so clocks can tick between snapshots. */
  const view = { snapshot: null, serverNow: 0, receivedAt: 0 };

  /** Seconds since an ISO time of the server, on the server's clock (immune to skew). */
  function secondsSince(iso) {
    const then = Date.parse(iso);
    if (Number.isNaN(then) || !view.serverNow) return NaN;
    return (view.serverNow - then + (performance.now() - view.receivedAt)) / 1000;
  }

  const WORKER_COLUMNS = [
    ["name", "Name"],
    ["status", "Status"],
    ["load", "Load"],
    ["models", "Models"],
    ["processed", "Processed"],
    ["failures", "Failures"],
    ["tokens", "Tokens in / out"],
    ["version", "Version"],
    ["heartbeat", "Heartbeat"],
    ["last-error", "Last error"],
  ];
  const NUMERIC = new Set(["processed", "failures", "tokens"]);

  const workerRows = new Map();

  function createWorkerRow(id) {
    const tr = el("tr");
    tr.dataset.workerId = id;
    const cells = {}; // the content box of each cell: one element, so narrow layouts stay tidy
    for (const [name, label] of WORKER_COLUMNS) {
      const td = el("td", NUMERIC.has(name) ? "num" : "");
      td.dataset.field = name;
      td.dataset.label = label;
      cells[name] = el("span", "cell");
      td.append(cells[name]);
      tr.append(td);
    }
    const parts = {
      name: el("span", "worker-name"),
      id: el("span", "worker-id"),
      badge: el("span", "badge"),
      loadText: el("span", "load-text"),
      bar: el("span", "bar"),
      fill: el("span", "bar-fill"),
      tokensIn: el("span"),
      tokensOut: el("span"),
      error: el("span", "error-text"),
      modelsKey: null,
    };
    cells.name.append(parts.name, parts.id);
    cells.status.append(parts.badge);
    parts.bar.append(parts.fill);
    cells.load.classList.add("load");
    cells.load.append(parts.loadText, parts.bar);
    cells.tokens.append(parts.tokensIn, el("span", "sep", " / "), parts.tokensOut);
    cells["last-error"].append(parts.error);
    return { tr, cells, parts, heartbeat: "" };
  }

  function updateWorkerRow(row, w) {
    const { tr, cells, parts } = row;
    const status = String(w.status);
    if (tr.dataset.status !== status) tr.dataset.status = status;

    setText(parts.name, w.name || w.id);
    setText(parts.id, String(w.id).slice(0, 8));
    setTitle(
      parts.id,
      `id ${w.id}` +
        (w.backend ? ` · backend ${w.backend}` : "") +
        (w.server ? ` · connected to server ${w.server}` : ""),
    );

    setText(parts.badge, status);
    if (parts.badge.dataset.status !== status) parts.badge.dataset.status = status;

    const inflight = Number(w.inflight) || 0;
    const max = Math.max(1, Number(w.max_concurrency) || 1);
    setText(parts.loadText, `${inflight} / ${max}`);
    const ratio = Math.min(1, inflight / max);
    parts.fill.style.width = `${Math.round(ratio * 100)}%`;
    parts.bar.dataset.level = ratio >= 1 ? "full" : ratio >= 0.5 ? "busy" : "ok";

    const models = Array.isArray(w.models_supported) ? w.models_supported.map(String) : [];
    const modelsKey = JSON.stringify(models);
    if (parts.modelsKey !== modelsKey) {
      parts.modelsKey = modelsKey;
      const chips = models.map((m) => el("span", "chip", m));
      cells.models.replaceChildren(...(chips.length ? chips : [el("span", "muted", "none")]));
    }

    setText(cells.processed, fmtInt(w.processed_total));
    setTitle(cells.processed, w.processed_total ? `avg ${fmtInt(w.avg_processing_ms)} ms` : "");
    setText(cells.failures, fmtInt(w.failures_total));
    cells.failures.classList.toggle("bad", Number(w.failures_total) > 0);

    setText(parts.tokensIn, fmtCompact(w.tokens_in_total));
    setText(parts.tokensOut, fmtCompact(w.tokens_out_total));
    setTitle(cells.tokens, `${fmtInt(w.tokens_in_total)} in / ${fmtInt(w.tokens_out_total)} out`);

    setText(cells.version, w.version || "–");
    const build = [w.build_sha && `sha ${w.build_sha}`, w.build_date];
    setTitle(cells.version, build.filter(Boolean).join(" · "));

    row.heartbeat = String(w.last_heartbeat || "");
    tickHeartbeat(row);

    const error = String(w.last_error || "");
    setText(parts.error, error);
    setTitle(parts.error, error);
    cells["last-error"].parentElement.classList.toggle("has-error", error !== "");
  }

  function tickHeartbeat(row) {
    const age = secondsSince(row.heartbeat);
    setText(row.cells.heartbeat, Number.isNaN(age) ? "–" : fmtAgo(age));
    row.cells.heartbeat.classList.toggle("late", age > 15 && row.tr.dataset.status !== "gone");
  }

  function renderWorkers(workers) {
    const tbody = document.querySelector("#workers tbody");
    const seen = new Set(workers.map((w) => String(w.id)));
    for (const [id, row] of workerRows) {
      if (!seen.has(id)) {
        row.tr.remove();
        workerRows.delete(id);
      }
    }
    let next = tbody.firstElementChild;
    for (const w of workers) {
      const id = String(w.id);
      let row = workerRows.get(id);
      if (!row) {
        row = createWorkerRow(id);
        workerRows.set(id, row);
      }
      updateWorkerRow(row, w);
      if (row.tr === next) next = next.nextElementSibling;
      else tbody.insertBefore(row.tr, next);
    }
    document.getElementById("workers").hidden = workers.length === 0;
    document.getElementById("workers-empty").hidden = workers.length > 0;
    const count = workers.length;
    setText(field("workers-total"), count === 1 ? "1 worker" : `${count} workers`);
  }

  function renderModels(models, workers) {
    const totals = new Map();
    for (const w of workers) {
      for (const [name, t] of Object.entries(w.per_model || {})) {
        const sum = totals.get(name) || { ok: 0, errors: 0, tin: 0, tout: 0 };
        sum.ok += Number(t.success_total) || 0;
        sum.errors += Number(t.error_total) || 0;
        sum.tin += Number(t.tokens_in_total) || 0;
        sum.tout += Number(t.tokens_out_total) || 0;
        totals.set(name, sum);
      }
    }
    const rows = models.map((m) => {
      const name = String(m.name);
      const sum = totals.get(name) || { ok: 0, errors: 0, tin: 0, tout: 0 };
      const tr = el("tr");
      tr.dataset.model = name;
      const cells = [
        ["name", "Model", el("span", "chip", name)],
        ["workers", "Workers", fmtInt(m.workers)],
        ["succeeded", "Succeeded", fmtInt(sum.ok)],
        ["errors", "Errors", fmtInt(sum.errors)],
        ["tokens", "Tokens in / out", `${fmtCompact(sum.tin)} / ${fmtCompact(sum.tout)}`],
      ];
      for (const [key, label, content] of cells) {
        const td = el("td", key === "name" ? "" : "num");
        td.dataset.field = key;
        td.dataset.label = label;
        const cell = el("span", "cell");
        cell.append(content);
        if (key === "errors" && sum.errors > 0) cell.classList.add("bad");
        td.append(cell);
        tr.append(td);
      }
      return tr;
    });
    document.querySelector("#models tbody").replaceChildren(...rows);
    document.getElementById("models").hidden = models.length === 0;
    document.getElementById("models-empty").hidden = models.length > 0;
    setText(field("models-total"), models.length === 1 ? "1 model" : `${models.length} models`);
  }

  /** Per client key (by name, never the key): what it asked, what it holds, what it hit. */
  function renderKeys(keys) {
    const rows = keys.map((k) => {
      const tr = el("tr");
      tr.dataset.key = String(k.name);
      const name = el("span", "chip", String(k.name));
      if (k.disabled || k.expired) {
        name.classList.add("muted");
        name.title = k.disabled ? "disabled" : "expired";
      }
      const cells = [
        ["name", "Key", name],
        ["requests", "Requests", fmtInt(k.requests_total)],
        ["tokens", "Tokens in / out", `${fmtInt(k.tokens_in_total)} / ${fmtInt(k.tokens_out_total)}`],
        ["inflight", "In flight", fmtInt(k.in_flight)],
        ["queued", "Queued", fmtInt(k.queued)],
        ["limited", "Limited", fmtInt(k.limited_total)],
      ];
      for (const [key, label, content] of cells) {
        const td = el("td", key === "name" ? "" : "num");
        td.dataset.field = key;
        td.dataset.label = label;
        if (content instanceof Node) td.append(content);
        else td.append(el("span", "cell", content));
        tr.append(td);
      }
      return tr;
    });
    document.querySelector("#keys tbody").replaceChildren(...rows);
    document.getElementById("keys").hidden = keys.length === 0;
    document.getElementById("keys-empty").hidden = keys.length > 0;
    setText(field("keys-total"), keys.length === 1 ? "1 key" : `${keys.length} keys`);
  }

  /** MCP endpoints and their relays; every string came from a relay, so only as text. */
  function renderMcp(endpoints) {
    const rows = endpoints.map((e) => {
      const id = String(e.id);
      const relays = Array.isArray(e.relays) ? e.relays : [];
      const tr = el("tr");
      tr.dataset.mcpId = id;
      const name = el("span", "cell");
      name.append(el("span", "chip", id));
      if (e.token_required) {
        const lock = el("span", "mcp-token", "token");
        lock.title = "clients also need X-MCP-Token";
        name.append(lock);
      }
      const chips = relays.map((r) => {
        const status = String(r.status);
        const chip = el("span", "chip mcp-relay", String(r.name));
        chip.dataset.status = status;
        const load = `${fmtInt(r.sessions)} / ${fmtInt(r.max_sessions)} sessions`;
        chip.title = [status, load, r.version && `v${r.version}`].filter(Boolean).join(" · ");
        return chip;
      });
      const cells = [
        ["id", "Endpoint", name],
        ["relays", "Relays", chips.length ? chips : [el("span", "muted", "none")]],
        ["sessions", "Sessions", fmtInt(e.sessions)],
        ["calls", "Calls in flight", fmtInt(e.calls_in_flight)],
      ];
      for (const [key, label, content] of cells) {
        const td = el("td", key === "sessions" || key === "calls" ? "num" : "");
        td.dataset.field = key;
        td.dataset.label = label;
        if (content instanceof Node) td.append(content);
        else {
          const cell = el("span", "cell");
          cell.append(...(Array.isArray(content) ? content : [content]));
          td.append(cell);
        }
        tr.append(td);
      }
      return tr;
    });
    document.querySelector("#mcp tbody").replaceChildren(...rows);
    document.getElementById("mcp").hidden = endpoints.length === 0;
    document.getElementById("mcp-empty").hidden = endpoints.length > 0;
    const count = endpoints.length;
    setText(field("mcp-total"), count === 1 ? "1 endpoint" : `${count} endpoints`);
  }

  function render(snapshot) {
    view.snapshot = snapshot;
    view.serverNow = Date.parse(snapshot.server?.now) || Date.now();
    view.receivedAt = performance.now();

    const server = snapshot.server || {};
    const summary = snapshot.workers_summary || {};
    const workers = Array.isArray(snapshot.workers) ? snapshot.workers : [];
    const models = Array.isArray(snapshot.models) ? snapshot.models : [];

    setText(field("version"), server.version ? `v${server.version}` : "");
    const build = [
      server.build_sha && `build ${server.build_sha}`,
      server.build_date && String(server.build_date).slice(0, 10),
    ];
    setText(field("build"), build.filter(Boolean).join(" · ") || " ");
    setText(field("inflight"), fmtInt(server.jobs_inflight_total));
    setText(field("queue"), fmtInt(server.scheduler_queue_len));
    const capacity = workers
      .filter((w) => w.status !== "gone" && w.status !== "draining")
      .reduce((sum, w) => sum + (Number(w.max_concurrency) || 0), 0);
    setText(field("capacity"), fmtInt(capacity));
    field("inflight").classList.toggle("active", Number(server.jobs_inflight_total) > 0);
    setText(field("completed"), fmtInt(server.jobs_completed_total));
    setText(field("failed"), fmtInt(server.jobs_failed_total));
    field("failed").classList.toggle("bad", Number(server.jobs_failed_total) > 0);
    setText(field("workers-connected"), fmtInt(summary.connected));
    setText(field("workers-working"), fmtInt(summary.working));
    setText(field("workers-idle"), fmtInt(summary.idle));
    setText(field("workers-gone"), fmtInt(summary.gone));
    setText(field("updated"), `Updated ${new Date().toLocaleTimeString()}`);

    renderWorkers(workers);
    renderModels(models, workers);
    renderKeys(Array.isArray(snapshot.keys) ? snapshot.keys : []);
    renderMcp(Array.isArray(snapshot.mcp_endpoints) ? snapshot.mcp_endpoints : []);
    tick();
  }

  /** Once a second: clocks move even when the pool is quiet and no snapshot comes. */
  function tick() {
    const server = view.snapshot?.server;
    if (server) {
      const uptime = Number(server.uptime_s) + (performance.now() - view.receivedAt) / 1000;
      setText(field("uptime"), fmtDuration(uptime));
    }
    for (const row of workerRows.values()) tickHeartbeat(row);
    updateTitle();
  }

  function updateTitle() {
    const summary = view.snapshot?.workers_summary;
    const live = document.body.dataset.connection === "live";
    let title = "llamapool";
    if (summary) title += ` · ${summary.connected} online, ${summary.working} working`;
    if (!live && view.snapshot) title += " (disconnected)";
    if (document.title !== title) document.title = title;
  }

  // --- connection ----------------------------------------------------------------------------

  const LABELS = {
    connecting: "Connecting…",
    live: "Live",
    auth: "API key needed",
    reconnecting: "Disconnected",
  };

  /** Show the link's state; the detail (a countdown) changes often, so it is not announced. */
  function setConnection(state, label = LABELS[state], detail = "") {
    document.body.dataset.connection = state;
    const node = document.getElementById("connection");
    node.dataset.state = state;
    setText(node.querySelector(".label"), label);
    setText(node.querySelector(".detail"), detail);
    updateTitle();
  }

  let current = null; // the AbortController of the open stream
  let wake = () => {}; // cuts a reconnect wait short
  let restartNow = false; // the key changed: reconnect without waiting

  /** Wait ms milliseconds; resolves true if woken early. */
  function pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
    });
  }

  const storedKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  /** Read the stream until it ends; returns "auth" on 401, "dropped" otherwise. */
  async function streamOnce(key) {
    const controller = new AbortController();
    current = controller;
    const headers = { Accept: "text/event-stream" };
    if (key) headers.Authorization = `Bearer ${key}`;
    let stalled = null;
    try {
      const response = await fetch(STREAM_URL, {
        headers,
        signal: controller.signal,
        cache: "no-store",
        credentials: "same-origin",
      });
      if (response.status === 401) return "auth";
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      let heard = Date.now();
      stalled = setInterval(() => {
        if (Date.now() - heard > STALL_MS) controller.abort();
      }, 5000);
      const parser = new SSEParser((event) => {
        if (event.type !== "message") return;
        let snapshot;
        try {
          snapshot = JSON.parse(event.data);
        } catch (error) {
          console.warn("llamapool: ignoring a snapshot that is not JSON", error);
          return;
        }
        setConnection("live");
        render(snapshot);
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return "dropped";
        heard = Date.now();
        parser.push(value);
      }
    } finally {
      clearInterval(stalled);
      controller.abort();
      if (current === controller) current = null;
    }
  }

  async function run() {
    let attempt = 0;
    for (;;) {
      const key = storedKey();
      let outcome;
      try {
        outcome = await streamOnce(key);
      } catch (error) {
        outcome = "dropped";
      }
      if (outcome === "auth") {
        if (key) sessionStorage.removeItem(KEY_STORAGE);
        updateForgetButton();
        await askForKey(key ? "The server did not accept that key." : "");
        attempt = 0;
        setConnection("connecting");
        continue;
      }
      if (restartNow) {
        restartNow = false;
        setConnection("connecting");
        continue;
      }
      if (document.body.dataset.connection === "live") attempt = 0;
      const jitter = 0.75 + Math.random() * 0.5;
      const delay = Math.min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** attempt) * jitter;
      attempt += 1;
      await countdown(delay);
      setConnection("connecting", "Reconnecting…");
    }
  }

  async function countdown(ms) {
    const until = performance.now() + ms;
    for (;;) {
      const left = until - performance.now();
      if (left <= 0 || restartNow) return;
      const seconds = Math.ceil(left / 1000);
      setConnection("reconnecting", LABELS.reconnecting, ` · retrying in ${seconds}s`);
      if (await pause(Math.min(left, 1000))) return;
    }
  }

  // --- API key form --------------------------------------------------------------------------

  function askForKey(error) {
    setConnection("auth");
    const form = document.getElementById("auth");
    const input = document.getElementById("api-key");
    const message = document.getElementById("auth-error");
    message.hidden = !error;
    setText(message, error);
    form.hidden = false;
    input.value = "";
    input.focus();
    return new Promise((resolve) => {
      const submit = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!/^[\x21-\x7e]+$/.test(key)) {
          setText(message, "An API key is printable ASCII, without spaces.");
          message.hidden = false;
          return;
        }
        sessionStorage.setItem(KEY_STORAGE, key);
        input.value = "";
        form.hidden = true;
        form.removeEventListener("submit", submit);
        updateForgetButton();
        resolve();
      };
      form.addEventListener("submit", submit);
    });
  }

  function updateForgetButton() {
    document.getElementById("forget-key").hidden = !storedKey();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_STORAGE);
    updateForgetButton();
    restartNow = true;
    wake();
    if (current) current.abort();
  }

  // --- start ---------------------------------------------------------------------------------

  window.llamapool = Object.freeze({ SSEParser });

  function start() {
    document.getElementById("forget-key").addEventListener("click", forgetKey);
    updateForgetButton();
    setInterval(tick, 1000);
    run();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
