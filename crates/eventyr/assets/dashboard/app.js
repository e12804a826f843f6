// The Eventyr dashboard: logs in at the gateway (admin role), then follows
// /admin/dashboard/stream (server-sent events, a snapshot a second) and draws the
// panels. No framework, no CDN: plain DOM and SVG.
"use strict";

const TOKEN = "eventyr.dashboard.token";
const REFRESH = "eventyr.dashboard.refresh";
let token = sessionStorage.getItem(TOKEN);
let refreshToken = sessionStorage.getItem(REFRESH);
// The saga whose timeline is open, and its last change as shown.
let openSaga = null;
let openSagaUpdated = null;
// What each element was last written with.
const written = new Map();

const $ = (id) => document.getElementById(id);

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function ms(value) {
  if (value == null) return "–";
  if (value < 1000) return `${value.toFixed(0)} ms`;
  if (value < 60000) return `${(value / 1000).toFixed(2)} s`;
  return `${(value / 60000).toFixed(1)} min`;
}

function pct(value) {
  return value == null ? "–" : `${(value * 100).toFixed(1)} %`;
}

function num(value, digits = 0) {
  return value == null ? "–" : Number(value).toLocaleString("en", { maximumFractionDigits: digits });
}

function time(ts) {
  return ts ? new Date(ts).toLocaleTimeString() : "–";
}

// Writes an element's markup only when it changed: rows under the pointer stay put.
function html(id, markup) {
  if (written.get(id) !== markup) {
    $(id).innerHTML = markup;
    written.set(id, markup);
  }
}

function tile(label, value, cls = "", attrs = "") {
  return `<div class="tile ${cls}" ${attrs}><div class="label">${esc(label)}</div><div class="value">${esc(value)}</div></div>`;
}

// --- login --------------------------------------------------------------------------

function showLogin(message = "") {
  token = null;
  refreshToken = null;
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(REFRESH);
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("live").textContent = "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/auth/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username: $("username").value, password: $("password").value }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    $("login-error").textContent = body.message || `login failed (${response.status})`;
    return;
  }
  keep(body);
  start();
});

// The token pair of a login or a refresh.
function keep(pair) {
  token = pair.access_token;
  refreshToken = pair.refresh_token;
  sessionStorage.setItem(TOKEN, token);
  sessionStorage.setItem(REFRESH, refreshToken);
}

// Access tokens last 15 minutes: a refused one is renewed with the refresh token, one
// refresh at a time (refresh tokens rotate; a spent one presented again would revoke
// the session).
let refreshing = null;
function refresh() {
  if (!refreshToken) return Promise.resolve(false);
  refreshing ??= (async () => {
    const response = await fetch("/auth/refresh", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ refresh_token: refreshToken }),
    }).catch(() => null);
    if (!response || !response.ok) return false;
    keep(await response.json());
    return true;
  })().finally(() => { refreshing = null; });
  return refreshing;
}

$("logout").addEventListener("click", async () => {
  await fetch("/auth/logout", { method: "POST", headers: { authorization: `Bearer ${token}` } }).catch(() => {});
  showLogin();
});

async function api(path, options = {}, renewed = false) {
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), authorization: `Bearer ${token}` },
  });
  if (response.status === 401 && !renewed && (await refresh())) {
    return api(path, options, true);
  }
  if (response.status === 401) {
    showLogin("Your session ended; log in again.");
    throw new Error("unauthorized");
  }
  if (response.status === 403) {
    showLogin("The dashboard needs the admin role.");
    throw new Error("forbidden");
  }
  return response;
}

// --- the live stream -----------------------------------------------------------------

async function follow() {
  while (token) {
    try {
      const response = await api("/admin/dashboard/stream", { headers: { accept: "text/event-stream" } });
      if (!response.ok || !response.body) throw new Error(`stream: ${response.status}`);
      $("live").textContent = "live";
      $("live").className = "live on";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const chunk = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (data) render(JSON.parse(data));
        }
      }
    } catch (error) {
      if (!token) return;
    }
    $("live").textContent = "reconnecting…";
    $("live").className = "live";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function start() {
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  follow();
}

// --- charts ---------------------------------------------------------------------------

// Stacked bars: series = [{values, color}], one bar per index.
function bars(series, labels) {
  const n = series[0].values.length;
  const max = Math.max(1, ...Array.from({ length: n }, (_, i) => series.reduce((s, x) => s + x.values[i], 0)));
  const w = 600, h = 120, bw = w / n;
  let out = "";
  for (let i = 0; i < n; i++) {
    let y = h;
    for (const s of series) {
      const bh = (s.values[i] / max) * (h - 14);
      if (bh > 0) out += `<rect x="${(i * bw + 0.5).toFixed(1)}" y="${(y - bh).toFixed(1)}" width="${Math.max(bw - 1, 1).toFixed(1)}" height="${bh.toFixed(1)}" fill="${s.color}"><title>${esc(labels[i])}: ${s.values[i]}</title></rect>`;
      y -= bh;
    }
  }
  return `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">${out}<text x="4" y="11" font-size="10" fill="#667085">max ${num(max)}</text></svg>`;
}

// Lines: series = [{values, color}], over the same x.
function lines(series) {
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const max = Math.max(1e-9, ...series.flatMap((s) => s.values));
  const w = 600, h = 120;
  const paths = series.map((s) => {
    const pts = s.values.map((v, i) => `${((i / (n - 1)) * w).toFixed(1)},${(h - 4 - (v / max) * (h - 18)).toFixed(1)}`);
    return `<polyline fill="none" stroke="${s.color}" stroke-width="1.5" points="${pts.join(" ")}"/>`;
  }).join("");
  return `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">${paths}<text x="4" y="11" font-size="10" fill="#667085">max ${num(max, 1)}</text></svg>`;
}

// --- panels ---------------------------------------------------------------------------

const STATUSES = ["STARTED", "IN_PROGRESS", "COMPLETED", "COMPENSATING", "COMPENSATED", "FAILED"];

function sagaRow(s) {
  return `<tr class="link" data-saga="${esc(s.id)}"><td title="${esc(s.id)}">${esc(s.id)}</td><td><span class="status ${esc(s.status)}">${esc(s.status)}</span>${s.flagged ? " ⚑" : ""}</td><td>${time(s.started_at)}</td><td class="num">${ms(s.duration_ms)}</td><td title="${esc(s.reason)}">${esc(s.reason || "")}</td></tr>`;
}

const SAGA_HEAD = `<tr><th>saga</th><th>status</th><th>started</th><th class="num">duration</th><th>reason</th></tr>`;

function renderSagas(f) {
  $("saga-window").textContent = `(figures over the last ${Math.round(f.window_s / 60)} min; counts since the log began)`;
  html("saga-counts", tile("total", num(f.total), "", 'data-count="total"') + STATUSES.map((s) =>
    tile(s.replace("_", " ").toLowerCase(), num(f.by_status[s] ?? 0), s === "FAILED" && f.by_status[s] ? "bad" : "", `data-status="${s}"`)).join(""));
  html("saga-figures", [
    tile("success rate", pct(f.success_rate), f.success_rate != null && f.success_rate < 0.95 ? "bad" : "good"),
    tile("average", ms(f.duration_avg_ms), f.duration_avg_ms > 10000 ? "bad" : ""),
    tile("p95", ms(f.duration_p95_ms)),
    tile("per minute", num(f.throughput_per_minute, 1)),
    tile("compensations", num(f.compensations)),
    tile("failed compensations", num(f.compensations_failed), f.compensations_failed ? "bad" : ""),
    tile("stuck", num(f.stuck.length), f.stuck.length ? "warn" : ""),
    tile("flagged", num(f.flagged), f.flagged ? "bad" : ""),
  ].join(""));
  html("saga-chart", bars(
    [{ values: f.per_minute.map((m) => m.completed), color: "#1f9d55" }, { values: f.per_minute.map((m) => m.failed), color: "#d0342c" }],
    f.per_minute.map((m) => time(m.at))));
  html("recent", SAGA_HEAD + (f.recent.slice(0, 15).map(sagaRow).join("") || `<tr><td class="empty" colspan="5">no sagas yet</td></tr>`));
  html("stuck", SAGA_HEAD + (f.stuck.slice(0, 15).map(sagaRow).join("") || `<tr><td class="empty" colspan="5">none</td></tr>`));
}

function renderServices(services) {
  html("services", services.map((s) =>
    `<span class="badge ${s.ready ? "up" : "down"}" title="${esc(s.detail || s.address)}" data-service="${esc(s.name)}">${esc(s.name)}</span>`).join(""));
}

function renderThroughput(history) {
  html("throughput-chart", lines([{ values: history.map((h) => h.events_per_second), color: "#2f6fd6" }]));
}

function renderGateway(g, history) {
  html("gateway-figures", [
    tile("requests/s", num(g.requests_per_second, 1)),
    tile("5xx/s", num(g.errors_per_second, 2), g.errors_per_second > 0.1 ? "bad" : ""),
    tile("requests", num(g.requests_total)),
    tile("in flight", num(g.active)),
  ].join(""));
  html("gateway-chart", lines([
    { values: history.map((h) => h.requests_per_second), color: "#2f6fd6" },
    { values: history.map((h) => h.errors_per_second), color: "#d0342c" },
  ]));
}

function renderRateLimits(rules) {
  if (!rules.length) {
    html("ratelimit-rules", `<p class="empty">no rate-limit rules</p>`);
    return;
  }
  html("ratelimit-rules", rules.map((r) => `
    <div class="rule" data-rule="${esc(r.name)}">
      <h3>${esc(r.name)} <small>${esc(r.algorithm)}, ${num(r.limit)} per ${num(r.period_s, 1)} s, key ${esc(r.key)}${r.tier ? `, tier ${esc(r.tier)}` : ""}${r.shadow ? ", shadow" : ""}</small></h3>
      <div class="tiles">${tile("allowed/s", num(r.allowed_per_second, 1))}${tile("limited/s", num(r.limited_per_second, 1), r.limited_per_second ? "warn" : "")}${tile("allowed", num(r.allowed))}${tile("limited", num(r.limited))}</div>
      <div class="chart">${lines([{ values: r.history.map((h) => h.allowed), color: "#1f9d55" }, { values: r.history.map((h) => h.limited), color: "#d0342c" }])}</div>
      <div class="legend"><i style="background:#1f9d55"></i>allowed/s<i style="background:#d0342c"></i>limited/s</div>
      <div class="tables">
        <table><tr><th>hottest keys</th><th class="num">used</th></tr>${r.hottest.map((k) => `<tr><td title="${esc(k.key)}">${esc(k.key)}</td><td class="num">${num(k.used, 1)}</td></tr>`).join("") || `<tr><td class="empty" colspan="2">none</td></tr>`}</table>
        <table><tr><th>most limited keys</th><th class="num">denials</th></tr>${r.top_limited.map((k) => `<tr><td title="${esc(k.key)}">${esc(k.key)}</td><td class="num">${num(k.count)}</td></tr>`).join("") || `<tr><td class="empty" colspan="2">none</td></tr>`}</table>
      </div>
    </div>`).join(""));
}

function renderProjections(projections) {
  html("projection-table", `<tr><th>projection</th><th>state</th><th class="num">position</th><th class="num">lag (events)</th><th class="num">lag</th><th></th></tr>` +
    (projections.map((p) => `<tr data-projection="${esc(p.name)}" data-generation="${esc(p.generation ?? "")}"><td>${esc(p.name)}</td><td title="${esc(p.error || "")}">${esc(p.state)}</td><td class="num">${num(p.position)}</td><td class="num">${num(p.lag_events)}</td><td class="num">${ms(p.lag_seconds * 1000)}</td><td><button class="action rebuild" data-name="${esc(p.name)}">Rebuild</button></td></tr>`).join("") ||
      `<tr><td class="empty" colspan="6">no projections</td></tr>`));
}

function renderConsumers(consumers) {
  html("consumer-table", `<tr><th>consumer</th><th class="num">lag</th><th class="num">handled</th><th class="num">retries</th><th class="num">dead letters</th></tr>` +
    (consumers.map((c) => `<tr data-consumer="${esc(c.name)}"><td>${esc(c.name)}</td><td class="num">${num(c.lag_messages)}</td><td class="num">${num(c.acknowledged)}</td><td class="num">${num(c.retries)}</td><td class="num ${c.dead_letters ? "bad" : ""}">${num(c.dead_letters)}</td></tr>`).join("") ||
      `<tr><td class="empty" colspan="5">no consumers</td></tr>`));
}

function render(snapshot) {
  renderServices(snapshot.services);
  renderSagas(snapshot.sagas);
  renderThroughput(snapshot.history);
  renderGateway(snapshot.gateway, snapshot.history);
  renderRateLimits(snapshot.ratelimits);
  renderProjections(snapshot.projections);
  renderConsumers(snapshot.consumers);
  document.body.dataset.updated = snapshot.at;
  // The open timeline follows its saga.
  const open = snapshot.sagas.recent.find((s) => s.id === openSaga);
  if (open && open.updated_at !== openSagaUpdated) showSaga(openSaga, false);
}

// --- one saga's timeline --------------------------------------------------------------

async function showSaga(id, scroll = true) {
  openSaga = id;
  const response = await api(`/admin/sagas/${encodeURIComponent(id)}`);
  const saga = await response.json();
  if (!response.ok) return;
  openSagaUpdated = saga.updated_at;
  $("timeline").hidden = false;
  $("timeline-id").textContent = saga.id;
  html("timeline-summary", `<div class="tiles">${tile("status", saga.status)}${tile("type", saga.saga_type)}${tile("started", time(saga.started_at))}${tile("duration", ms(new Date(saga.updated_at) - new Date(saga.started_at)))}</div>` +
    (saga.reason ? `<p class="error">${esc(saga.reason)}</p>` : ""));
  const events = saga.events.map((e) => ({ ...e.event, at: new Date(e.event.at || e.recorded_at) }));
  const t0 = new Date(saga.started_at).getTime();
  const t1 = Math.max(t0 + 1, ...events.map((e) => e.at.getTime()));
  // A bar per attempt: from its request to its outcome.
  const rows = [];
  const open = new Map();
  for (const e of events) {
    const comp = e.type.startsWith("Compensation");
    const key = `${comp ? "undo " : ""}${e.step}#${e.attempt}`;
    if (e.type === "StepRequested" || e.type === "CompensationRequested") {
      open.set(key, { label: `${comp ? "undo " : ""}${e.step} #${e.attempt}`, from: e.at, to: null, outcome: "pending", comp });
      rows.push(open.get(key));
    } else if (open.has(key)) {
      const row = open.get(key);
      row.to = e.at;
      row.outcome = /Succeeded/.test(e.type) ? "ok" : "failed";
      row.error = e.error;
    }
  }
  const w = 900, rh = 22, left = 190, h = rows.length * rh + 24;
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (w - left - 10);
  const color = { ok: "#1f9d55", failed: "#d0342c", pending: "#2f6fd6" };
  const svg = rows.map((r, i) => {
    const from = x(r.from.getTime()), to = x((r.to || new Date(t1)).getTime());
    return `<text x="4" y="${i * rh + 15}" font-size="12">${esc(r.label)}</text>
      <rect x="${from.toFixed(1)}" y="${i * rh + 4}" width="${Math.max(to - from, 3).toFixed(1)}" height="${rh - 8}" rx="3" fill="${color[r.outcome]}" ${r.comp ? 'fill-opacity="0.6"' : ""}><title>${esc(r.label)}: ${r.outcome}${r.error ? ` — ${esc(r.error)}` : ""} (${ms((r.to || new Date(t1)) - r.from)})</title></rect>`;
  }).join("");
  html("timeline-chart", `<svg viewBox="0 0 ${w} ${h}" width="100%" height="${h}" data-steps="${rows.length}">${svg}<text x="${left}" y="${h - 4}" font-size="10" fill="#667085">0</text><text x="${w - 60}" y="${h - 4}" font-size="10" fill="#667085">${ms(t1 - t0)}</text></svg>`);
  html("timeline-events", `<tr><th class="num">+time</th><th>event</th><th>step</th><th class="num">attempt</th><th>detail</th></tr>` +
    events.map((e) => `<tr class="event"><td class="num">${ms(e.at - t0)}</td><td>${esc(e.type)}</td><td>${esc(e.step || "")}</td><td class="num">${esc(e.attempt ?? "")}</td><td title="${esc(e.error || e.reason || "")}">${esc(e.error || e.reason || e.status || "")}</td></tr>`).join(""));
  if (scroll) $("timeline").scrollIntoView();
}

document.addEventListener("click", async (event) => {
  const row = event.target.closest("tr[data-saga]");
  if (row) {
    showSaga(row.dataset.saga);
    return;
  }
  const rebuild = event.target.closest("button.rebuild");
  if (rebuild) {
    rebuild.disabled = true;
    await api(`/admin/projections/${encodeURIComponent(rebuild.dataset.name)}/rebuild`, { method: "POST" }).catch(() => {});
    rebuild.disabled = false;
  }
});

$("timeline-close").addEventListener("click", () => {
  $("timeline").hidden = true;
  openSaga = null;
  openSagaUpdated = null;
});

if (token) start(); else showLogin();
