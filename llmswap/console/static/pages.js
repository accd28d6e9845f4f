// The Failed view (the last failed requests, each with what explains it) and the Config view
// (the file with its secrets masked, check at a line, apply and what changed).
"use strict";

// -- failed requests ----------------------------------------------------------------------------

let failures = [];
let openAt = null;  // the time of the failure whose details are open

async function onFailed() {
  try {
    failures = (await (await api("/admin/failures")).json()).failures;
  } catch (e) {
    return;
  }
  $("failed-count").textContent = failures.length;
  $("failed-rows").innerHTML = failures.map((f) => `<tr data-at="${f.at}"${f.at === openAt ? ' class="open"' : ""}><td>${clock(f.at)}</td>
    <td>${esc(ROUTES[f.path] || f.path)}</td><td>${esc(f.model)}</td><td>${esc(f.key)}</td><td>${f.status || "cut"}</td>
    <td class="error">${esc(f.error || "")}</td></tr>`).join("");
  if (openAt !== null) details(openAt);
}
views.failed = onFailed;

async function openFailure(at) {
  openAt = at;
  show("failed");
  await onFailed();
}

$("failed-rows").addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-at]");
  if (row) openFailure(Number(row.dataset.at));
});

function details(at) {
  const f = failures.find((x) => x.at === at);
  $("failure").hidden = !f;
  if (!f) return;
  const status = f.status === 0 ? "cut off" : f.status === 499 ? "the client left" : `status ${f.status}`;
  $("failure-title").textContent = `${clock(f.at)} ${f.method} ${f.path} → ${f.model}: ${status}`;
  $("failure-error").textContent = f.error ? `llmswap: ${f.error}` : "";
  $("failure-state").textContent = f.state ? `${f.model} was ${f.state.state}${f.state.error ? `: ${f.state.error}` : ""}` : "";
  $("failure-request").textContent = pretty(f.request) || "(no body)";
  $("failure-answer").textContent = pretty(f.answer) || "(nothing from the backend)";
  $("failure-output").textContent = f.output === null ? "(reading…)" : f.output.join("\n") || "(no output)";
  $("failure-replay").hidden = !replayable(f);
}

function pretty(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
}

function replayable(f) {
  try { return f.path === "/v1/chat/completions" && Array.isArray(JSON.parse(f.request).messages); } catch (e) { return false; }
}

$("failure-replay").addEventListener("click", () => {
  const f = failures.find((x) => x.at === openAt);
  if (f) replay(JSON.parse(f.request));
});

// -- configuration ------------------------------------------------------------------------------

let configFile = null;  // what GET /admin/config answered

async function showConfig() {
  try {
    configFile = await (await api("/admin/config")).json();
  } catch (e) {
    $("cfg-status").textContent = e.message;
    return;
  }
  $("cfg-source").textContent = configFile.source;
  $("cfg-included").textContent = configFile.included.length ? `and ${configFile.included.join(", ")} (listed here, not edited)` : "";
  $("cfg-running").textContent = configFile.running.join("\n");
  $("cfg-keys").innerHTML = configFile.keys.length
    ? "<tr><th>Key</th><th>Its secret comes from</th></tr>" + configFile.keys.map((k) => `<tr><td>${esc(k.name)}</td><td>${esc(k.from)}</td></tr>`).join("")
    : "";
  if ($("cfg-text").dataset.edited !== "1") setText(configFile.text);
  for (const id of ["cfg-text", "cfg-check", "cfg-apply", "cfg-reset"]) $(id).disabled = !configFile.editable;
  $("cfg-status").textContent = configFile.read_only ? `Read-only here: ${configFile.read_only}.`
    : configFile.unreadable ? "The file is not valid YAML (or not UTF-8), so its secrets cannot be found: it is not shown. Fix it on the box, or write the whole file here." : "";
}
views.config = showConfig;

function setText(text) {
  $("cfg-text").value = text;
  $("cfg-text").dataset.edited = "";
  marks([]);
}

// Line numbers, the lines with a problem marked.
function marks(problems) {
  const bad = new Set(problems.map((p) => p.line));
  const count = $("cfg-text").value.split("\n").length;
  $("cfg-gutter").innerHTML = Array.from({ length: count }, (_, i) => (bad.has(i + 1) ? `<b data-line="${i + 1}">${i + 1}</b>` : `${i + 1}`)).join("\n");
  $("cfg-gutter").scrollTop = $("cfg-text").scrollTop;
  $("cfg-problems").innerHTML = problems.map((p) => `<li data-line="${p.line ?? ""}">${p.line ? `line ${p.line}: ` : ""}${esc(p.message)}</li>`).join("");
}

$("cfg-text").addEventListener("input", () => { $("cfg-text").dataset.edited = "1"; marks([]); $("cfg-changes").innerHTML = ""; });
$("cfg-text").addEventListener("scroll", () => { $("cfg-gutter").scrollTop = $("cfg-text").scrollTop; });
$("cfg-reset").addEventListener("click", () => { if (configFile) setText(configFile.text); $("cfg-status").textContent = ""; });

// A problem clicked selects its line in the editor.
$("cfg-problems").addEventListener("click", (event) => {
  const line = Number(event.target.closest("li")?.dataset.line);
  if (!line) return;
  const text = $("cfg-text").value, lines = text.split("\n");
  const start = lines.slice(0, line - 1).join("\n").length + (line > 1 ? 1 : 0);
  $("cfg-text").focus();
  $("cfg-text").setSelectionRange(start, start + lines[line - 1].length);
});

async function send(path) {
  const response = await fetch(path, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Requested-With": "llmswap-console" },
    body: JSON.stringify({ text: $("cfg-text").value }) });
  if (response.status === 401) { showLogin(); throw new Error("login needed"); }
  return [response.status, await response.json()];
}

$("cfg-check").addEventListener("click", async () => {
  $("cfg-status").textContent = "checking…";
  $("cfg-changes").innerHTML = "";
  const [status, verdict] = await send("/admin/config/check");
  if (status !== 200) { $("cfg-status").textContent = verdict.error?.message || status; return; }
  marks(verdict.problems);
  $("cfg-status").textContent = verdict.ok ? `OK: ${verdict.models.length} models (${verdict.models.join(", ")})` : "refused";
});

$("cfg-apply").addEventListener("click", async () => {
  $("cfg-status").textContent = "applying…";
  $("cfg-changes").innerHTML = "";
  const [status, answer] = await send("/admin/config/apply");
  if (status !== 200) {
    $("cfg-status").textContent = answer.error?.message || status;
    if (answer.error?.code === "invalid_config") {  // each problem at its line, as a check finds them
      const [, verdict] = await send("/admin/config/check");
      marks(verdict.problems || []);
    }
    return;
  }
  marks([]);
  const c = answer.changes;
  const list = (what, names) => `<li>${what}: ${names.length ? names.map(esc).join(", ") : "none"}</li>`;
  $("cfg-changes").innerHTML = `<ul class="changes">${list("added", c.added)}${list("changed", c.changed)}${list("removed", c.removed)}${list("restarted", c.restarted)}</ul>`;
  $("cfg-status").textContent = `applied; the previous file is ${answer.backup}`;
  $("cfg-text").dataset.edited = "";
  showConfig();
});
