// llmswap's console: one live event stream (/admin/events) and a few JSON and text routes.
"use strict";

const $ = (id) => document.getElementById(id);
const STATE_COLORS = { starting: "#d97706", ready: "#16a34a", draining: "#0d9488", stopping: "#9ca3af", asleep: "#6366f1", failed: "#dc2626" };
const ROUTES = { "/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
  "/api/chat": "ollama chat", "/api/generate": "ollama generate", "/api/embed": "ollama embed" };
let state = null;      // the last "state" event: models, queue, devices
let offset = 0;        // server clock minus this browser's, in seconds
let activity = [];     // newest first
let shownModels = "";  // the model rows' HTML now on the page
let timeline = { changes: [], swaps: [], depth: [], memory: {} };
let source = null;     // the EventSource
let logAbort = null;   // stops the followed log

const now = () => Date.now() / 1000 + offset;
const secs = (s) => (s === null || s === undefined ? "" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(1)} s`);
const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;
const esc = (t) => String(t ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

async function api(path, options = {}) {
  const headers = { "X-Requested-With": "llmswap-console", ...(options.headers || {}) };
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  if (response.status === 401) { showLogin(); throw new Error("login needed"); }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error?.message || body.error || response.statusText);
  }
  return response;
}

// -- access -----------------------------------------------------------------------------------

function showLogin(why) {
  $("login").hidden = false;
  if (why) $("login-why").textContent = why;
  $("login-key").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  const key = $("login-key").value.trim();
  const response = await fetch("/admin/session", { method: "POST", credentials: "same-origin",
    headers: { Authorization: `Bearer ${key}`, "X-Requested-With": "llmswap-console" } });
  $("login-key").value = "";  // the key is sent once, in a header, and not kept
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    $("login-error").textContent = body.error?.message || response.statusText;
    return;
  }
  $("login").hidden = true;
  $("logout").hidden = false;
  start();
});

$("logout").addEventListener("click", async () => {
  await fetch("/admin/session", { method: "DELETE", credentials: "same-origin", headers: { "X-Requested-With": "llmswap-console" } });
  location.reload();
});

// -- tabs -------------------------------------------------------------------------------------

// What each view does when shown (the other scripts add theirs).
const views = { logs: () => followLog() };
const showing = (view) => $(view).classList.contains("active");

function show(view) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === view));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === view));
  if (views[view]) views[view]();
}
for (const tab of document.querySelectorAll("#tabs button")) tab.addEventListener("click", () => show(tab.dataset.view));

// -- live stream ------------------------------------------------------------------------------

async function start() {
  try {
    const response = await api("/admin/activity?limit=1000");
    activity = (await response.json()).activity;
    timeline = await (await api("/admin/timeline")).json();
  } catch (e) {
    if (e.message !== "login needed") { $("refused").hidden = false; $("refused").textContent = e.message; }
    return;
  }
  renderActivity();
  renderSwaps();
  onFailed();
  if (source) source.close();
  source = new EventSource("/admin/events");
  source.onopen = () => { $("link").textContent = "live"; $("link").className = "link up"; };
  source.onerror = () => { $("link").textContent = "reconnecting"; $("link").className = "link down"; };
  source.addEventListener("state", (e) => {
    state = JSON.parse(e.data);
    offset = state.now - Date.now() / 1000;
    remember(state);
    renderModels();
    renderQueue();
    fillLogSources();
  });
  source.addEventListener("activity", (e) => {
    const rows = JSON.parse(e.data);
    activity = rows.reverse().concat(activity).slice(0, 5000);
    renderActivity();
    if (rows.some(failed)) onFailed();
  });
  source.addEventListener("timeline", (e) => {
    for (const item of JSON.parse(e.data)) {
      if (item.change) timeline.changes.push(item.change);
      if (item.swap) timeline.swaps.push(item.swap);
    }
    renderSwaps();
  });
  source.addEventListener("resync", start);
}

// -- models -----------------------------------------------------------------------------------

function where(m) {
  const b = m.backend || {};
  if (b.kind === "docker") return `container ${esc(b.container)} (${esc(b.container_state)})`;
  if (b.pid) return `pid ${b.pid}`;
  return "";
}

function renderModels() {
  const rows = [];
  const used = {};
  // With several hosts each row says which (a device's name says it already), and an engine
  // that does not answer is shown.
  const hosts = Object.entries(state.hosts || {});
  const boxes = hosts.length > 1;
  for (const [name, m] of Object.entries(state.models)) {
    if (["starting", "ready", "draining", "stopping"].includes(m.state) && m.memory) used[m.device] = (used[m.device] || 0) + m.memory;
    // Asleep, it holds host memory on its sleep device instead of its device's.
    if (m.state === "asleep" && m.sleep_memory) used[m.sleep_device] = (used[m.sleep_device] || 0) + m.sleep_memory;
    let load = m.last_load_seconds ? `usually ${secs(m.last_load_seconds)}` : "";
    if (m.state === "starting") load = `loading for ${secs(now() - m.since)}` + (m.last_load_seconds ? `, usually ${secs(m.last_load_seconds)}` : "");
    // Its linger now, learned from how often its follow-up came while another model waited.
    const lg = m.linger || {};
    const bets = (lg.paid || 0) + (lg.wasted || 0);
    load += `<div class="linger">${lg.seconds ? `lingers ${secs(lg.seconds)}` : "no linger"}${bets ? ` · paid ${lg.paid} of ${bets}` : ""}</div>`;
    let expires = "";
    if (m.state === "ready" && m.ttl !== null && !m.in_flight) expires = secs(Math.max(0, m.last_used + m.ttl - now()));
    const resident = ["starting", "ready", "draining"].includes(m.state);
    rows.push(`<tr data-model="${esc(name)}"><td>${esc(name)}</td>
      <td><span class="state ${m.state}">${m.state}</span>${m.error ? `<div class="error">${esc(m.error)}</div>` : ""}</td>
      <td>${where(m)}${m.memory ? ` on ${esc(m.device)}` : boxes ? ` on host ${esc(m.host)}` : ""}${m.measured ? `<div class="measured">measured ${mib(m.measured)}</div>` : ""}</td><td>${load}</td><td>${m.waiting}</td><td>${m.in_flight}</td>
      <td>${expires}</td><td><button class="act" data-do="${resident ? "unload" : "load"}" data-model="${esc(name)}">${resident ? "Unload" : "Load"}</button></td></tr>`);
  }
  // Only when something shown changed: a row rebuilt between a press and a release eats the click.
  const html = rows.join("");
  if (html !== shownModels) $("model-rows").innerHTML = shownModels = html;
  // Each pool, and the member a request for it would be served by now.
  $("pools").innerHTML = Object.entries(state.pools || {}).map(([name, p]) =>
    `<div class="pool" data-pool="${esc(name)}">pool <b>${esc(name)}</b> (prefers ${esc(p.prefer)}): ` +
    p.models.map((m) => m === p.serving ? `<b class="serving">${esc(m)}</b>` : esc(m)).join(", ") +
    `</div>`).join("");
  $("budgets").innerHTML = Object.entries(state.devices).map(([device, size]) => {
    const share = Math.min(1, (used[device] || 0) / size);
    // A probed device also says what it really holds, by anyone (llmswap's models and others).
    const probed = (state.probed || {})[device];
    const real = probed ? `; measured in use: ${(probed.used / 2 ** 30).toFixed(1)} of ${(probed.total / 2 ** 30).toFixed(1)} GiB` : "";
    return `<div>${esc(device)} <span class="bar"><span data-share="${(share * 100).toFixed(1)}"></span></span>
      ${((used[device] || 0) / 2 ** 30).toFixed(1)} of ${(size / 2 ** 30).toFixed(1)} GiB counted${real}</div>`;
  }).join("") + hosts.filter(([, h]) => h.error).map(([name, h]) =>
    `<div class="error">host ${esc(name)}: ${esc(h.error)}</div>`).join("");
  // Widths set through the DOM: the page's Content-Security-Policy allows no inline style.
  for (const fill of $("budgets").querySelectorAll("[data-share]")) fill.style.width = `${fill.dataset.share}%`;
}

// A probed device's use over time, as the live state reports it (the Swaps view charts it).
function remember(live) {
  timeline.memory = timeline.memory || {};
  for (const [device, probed] of Object.entries(live.probed || {})) {
    const kept = timeline.memory[device] = timeline.memory[device] || [];
    const last = kept[kept.length - 1];
    if (!last || live.now - last[0] >= 5) kept.push([live.now, probed.used, probed.total]);
    while (kept.length && kept[0][0] < live.now - 6 * 3600) kept.shift();
  }
}

$("model-rows").addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-do]");
  if (!button) return;
  button.disabled = true;
  try {
    await api(`/admin/models/${encodeURIComponent(button.dataset.model)}/${button.dataset.do}`, { method: "POST" });
  } catch (e) {
    alert(e.message);
  } finally {
    button.disabled = false;
  }
});

// -- queue ------------------------------------------------------------------------------------

function renderQueue() {
  $("queue-count").textContent = state.waiting;
  const received = Date.now() / 1000;
  $("queue-rows").innerHTML = state.queue.map((w) => `<tr><td>${w.position}</td><td>${esc(w.model)}</td>
    <td>${esc(w.key)}</td><td data-age="${w.age}" data-at="${received}">${secs(w.age)}</td><td>${w.priority}</td></tr>`).join("");
  $("queue-more").textContent = state.waiting > state.queue.length ? `and ${state.waiting - state.queue.length} more` : "";
}

setInterval(() => {  // ages, countdowns and "loading for" tick between state events
  for (const cell of document.querySelectorAll("#queue-rows td[data-age]")) {
    cell.textContent = secs(Number(cell.dataset.age) + Date.now() / 1000 - Number(cell.dataset.at));
  }
  if (state) renderModels();
}, 1000);

// -- activity ---------------------------------------------------------------------------------

function renderActivity() {
  const model = $("f-model").value.trim(), key = $("f-key").value.trim(), status = $("f-status").value.trim();
  const shown = activity.filter((r) => (!model || r.model === model) && (!key || r.key === key) && (!status || String(r.status) === status)).slice(0, 1000);
  // A failed row opens its details (the Failed view); the playground's are marked.
  $("activity-rows").innerHTML = shown.map((r) => `<tr${failed(r) ? ` class="failed" data-at="${r.at}" title="details"` : ""}><td>${clock(r.at)}</td>
    <td>${esc(ROUTES[r.path] || r.path)}${r.console ? ' <span class="tag">console</span>' : ""}</td>
    <td>${esc(r.model)}</td><td>${esc(r.key)}</td><td>${r.status}</td><td>${secs(r.queue_wait)}</td><td>${secs(r.ttft)}</td>
    <td>${secs(r.duration)}</td><td>${r.prompt_tokens ?? ""}</td><td>${r.completion_tokens ?? ""}</td><td>${r.tokens_per_s ?? ""}</td></tr>`).join("");
  if (showing("activity")) drawActivity();
  if (showing("keys")) renderKeys();
}
const failed = (r) => r.status >= 400 || r.status === 0;
$("activity-rows").addEventListener("click", (event) => {
  const row = event.target.closest("tr.failed");
  if (row) openFailure(Number(row.dataset.at));
});
for (const id of ["f-model", "f-key", "f-status"]) $(id).addEventListener("input", renderActivity);

// -- swaps ------------------------------------------------------------------------------------

function renderSwaps() {
  $("swap-rows").innerHTML = timeline.swaps.slice(-200).reverse().map((s) => `<tr><td>${clock(s.at)}</td><td>${esc(s.cause)}</td>
    <td>${esc(s.loaded || "")}</td><td>${esc(s.unloaded.join(", "))}</td><td>${secs(s.stop_seconds)}</td><td>${secs(s.load_seconds)}</td></tr>`).join("");
  if (showing("swaps")) drawSwaps();
}

// -- logs -------------------------------------------------------------------------------------

function fillLogSources() {
  const select = $("log-source");
  const names = Object.keys(state.models);
  if (select.options.length === names.length + 1) return;
  select.innerHTML = `<option value="">llmswap</option>` + names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("");
}

const logLines = [];
function showLogLines() {
  const filter = $("log-filter").value.trim().toLowerCase();
  const shown = filter ? logLines.filter((l) => l.toLowerCase().includes(filter)) : logLines;
  const pre = $("log-lines");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 5;
  pre.textContent = shown.join("\n");
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

async function followLog() {
  if (logAbort) logAbort.abort();
  logAbort = new AbortController();
  logLines.length = 0;
  showLogLines();
  const model = $("log-source").value;
  const path = (model ? `/admin/logs/${encodeURIComponent(model)}` : "/admin/logs") + "?follow=1";
  try {
    const response = await api(path, { signal: logAbort.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let partial = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const lines = (partial + decoder.decode(value, { stream: true })).split("\n");
      partial = lines.pop();
      logLines.push(...lines);
      if (logLines.length > 2000) logLines.splice(0, logLines.length - 2000);
      showLogLines();
    }
  } catch (e) {
    if (e.name !== "AbortError") { logLines.push(`[${e.message}]`); showLogLines(); }
  }
}
$("log-source").addEventListener("change", followLog);
$("log-filter").addEventListener("input", showLogLines);

document.addEventListener("DOMContentLoaded", start);
