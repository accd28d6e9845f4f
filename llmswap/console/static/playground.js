// The playground: talk to a model (or a pool, or an alias) through the same API, queue, keys and
// limits as any client; its requests carry X-Requested-With, which marks them as the console's.
"use strict";

let conversation = [];  // the chat so far: {role, content}
let sending = null;     // the AbortController of the request under way

const HEADERS = { "Content-Type": "application/json", "X-Requested-With": "llmswap-console" };

async function fillModels() {
  const select = $("pg-model");
  try {
    const names = (await (await api("/v1/models")).json()).data.map((m) => m.id);
    const chosen = select.value;
    select.innerHTML = names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("");
    if (names.includes(chosen)) select.value = chosen;
  } catch (e) {
    $("pg-status").textContent = e.message;
  }
}
views.playground = fillModels;

function mode() {
  const chosen = $("pg-mode").value;
  $("pg-chat").hidden = chosen !== "chat";
  $("pg-input").hidden = chosen === "transcribe";
  $("pg-file").hidden = chosen !== "transcribe";
  $("pg-result").hidden = true;
}
$("pg-mode").addEventListener("change", mode);

function sampling() {
  const out = {};
  for (const [id, field, parse] of [["pg-temperature", "temperature", Number], ["pg-top-p", "top_p", Number], ["pg-max-tokens", "max_tokens", (v) => parseInt(v, 10)]]) {
    if ($(id).value !== "") out[field] = parse($(id).value);
  }
  return out;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("pg-messages").appendChild(div);
  return div;
}

function busy(on) {
  $("pg-send").disabled = on;
  $("pg-stop").disabled = !on;
}

async function failure(response) {
  const body = await response.json().catch(() => ({}));
  return new Error(body.error?.message || body.error || `${response.status} ${response.statusText}`);
}

// A chat, streamed: the loading comments (or reasoning) llmswap sends while the model swaps in
// are shown as they come; then the tokens, and the speed at the end.
async function chat(text) {
  const system = $("pg-system").value.trim();
  conversation.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  const thinking = document.createElement("div");
  thinking.className = "reasoning";
  answer.before(thinking);
  const body = { model: $("pg-model").value, stream: true, stream_options: { include_usage: true }, ...sampling(),
    messages: [...(system ? [{ role: "system", content: system }] : []), ...conversation] };
  const sent = performance.now();
  let first = null, pieces = 0, usage = null, loading = "";
  const response = await fetch("/v1/chat/completions", { method: "POST", credentials: "same-origin", headers: HEADERS,
    body: JSON.stringify(body), signal: sending.signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let partial = "";
  const waited = () => `waiting ${((performance.now() - sent) / 1000).toFixed(1)} s${loading ? ` (${loading})` : ""}`;
  $("pg-status").textContent = waited();
  const ticking = setInterval(() => { if (first === null) $("pg-status").textContent = waited(); }, 500);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const lines = (partial + decoder.decode(value, { stream: true })).split("\n");
      partial = lines.pop();
      for (const raw of lines) {
        const line = raw.trim();
        if (line.startsWith(":")) { loading = line.slice(1).trim(); continue; }  // ": loading chat, 10 s"
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
        if (event.usage) usage = event.usage;
        const delta = event.choices?.[0]?.delta || {};
        if (delta.reasoning_content) thinking.textContent += delta.reasoning_content;
        if (delta.content) {
          if (first === null) first = performance.now();
          pieces += 1;
          answer.textContent += delta.content;
        }
      }
    }
  } finally {
    clearInterval(ticking);
  }
  conversation.push({ role: "assistant", content: answer.textContent });
  const end = performance.now();
  const tokens = usage?.completion_tokens ?? pieces;
  const generating = first === null ? 0 : (end - first) / 1000;
  const speed = generating > 0 ? `, ${(tokens / generating).toFixed(1)} tokens/s` : "";
  const wait = first === null ? "" : `first token after ${((first - sent) / 1000).toFixed(2)} s${loading ? " (the model was loaded for it)" : ""}; `;
  $("pg-status").textContent = `${wait}${tokens} tokens${speed}`;
}

async function embed(text) {
  const response = await fetch("/v1/embeddings", { method: "POST", credentials: "same-origin", headers: HEADERS,
    body: JSON.stringify({ model: $("pg-model").value, input: text }), signal: sending.signal });
  if (!response.ok) throw await failure(response);
  const vector = (await response.json()).data[0].embedding;
  const norm = Math.sqrt(vector.reduce((sum, v) => sum + v * v, 0));
  $("pg-result").hidden = false;
  $("pg-result").textContent = `dimensions: ${vector.length}\nnorm: ${norm.toFixed(4)}\nfirst values: ${vector.slice(0, 8).map((v) => v.toFixed(4)).join(", ")}`;
  $("pg-status").textContent = "";
}

async function transcribe() {
  const file = $("pg-file").files[0];
  if (!file) throw new Error("choose an audio file");
  const form = new FormData();
  form.append("model", $("pg-model").value);
  form.append("file", file);
  const response = await fetch("/v1/audio/transcriptions", { method: "POST", credentials: "same-origin",
    headers: { "X-Requested-With": "llmswap-console" }, body: form, signal: sending.signal });
  if (!response.ok) throw await failure(response);
  const answer = await response.json();
  $("pg-result").hidden = false;
  $("pg-result").textContent = answer.text ?? JSON.stringify(answer, null, 2);
  $("pg-status").textContent = "";
}

$("pg-send").addEventListener("click", async () => {
  const text = $("pg-input").value.trim();
  const chosen = $("pg-mode").value;
  if (chosen !== "transcribe" && !text) return;
  sending = new AbortController();
  busy(true);
  $("pg-status").classList.remove("error");
  try {
    if (chosen === "chat") { $("pg-input").value = ""; await chat(text); }
    else if (chosen === "embed") await embed(text);
    else await transcribe();
  } catch (e) {
    $("pg-status").textContent = e.name === "AbortError" ? "stopped" : e.message;
    $("pg-status").classList.toggle("error", e.name !== "AbortError");
  } finally {
    busy(false);
  }
});
$("pg-stop").addEventListener("click", () => sending && sending.abort());
$("pg-clear").addEventListener("click", () => { conversation = []; $("pg-messages").innerHTML = ""; $("pg-status").textContent = ""; $("pg-result").hidden = true; });
$("pg-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("pg-send").click();
});

// A failed request sent again from here: its model, system prompt, earlier turns and last message.
async function replay(request) {
  show("playground");
  await fillModels();
  const select = $("pg-model");
  if (![...select.options].some((o) => o.value === request.model)) select.add(new Option(request.model, request.model));
  select.value = request.model;
  $("pg-mode").value = "chat";
  mode();
  const messages = request.messages.filter((m) => typeof m.content === "string");
  $("pg-system").value = messages.filter((m) => m.role === "system").map((m) => m.content).join("\n");
  const turns = messages.filter((m) => m.role !== "system");
  const last = turns.length && turns[turns.length - 1].role === "user" ? turns.pop() : null;
  conversation = turns;
  $("pg-messages").innerHTML = "";
  for (const m of turns) bubble(m.role, m.content);
  $("pg-input").value = last ? last.content : "";
  for (const [id, field] of [["pg-temperature", "temperature"], ["pg-top-p", "top_p"], ["pg-max-tokens", "max_tokens"]]) {
    $(id).value = request[field] ?? "";
  }
}
mode();
