// The console's charts, drawn with uPlot (vendored in vendor/, MIT): time ticks, drag to zoom
// (double-click zooms out), the cursor shared by the charts of one view.
"use strict";

const PALETTE = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0d9488", "#db2777", "#4b5563"];
const charts = {};           // by container id: the uPlot drawn there (tests read their scales)
window.charts = charts;
const zoomed = new Set();    // the views whose charts the user zoomed: live data keeps the zoom

// Draw ``data`` in the container ``id``: made again when its series change, else given the data.
function plot(id, group, series, data, options = {}) {
  const box = $(id);
  const width = Math.max(300, box.clientWidth || 900);
  const names = series.map((s) => s.label).join("\n");
  let chart = charts[id];
  if (chart && chart.names === names) {
    chart.setData(data, !zoomed.has(group));
    if (chart.width !== width) chart.setSize({ width, height: chart.height });
    return chart;
  }
  if (chart) chart.destroy();
  chart = new uPlot({
    width, height: options.height || 200,
    scales: { x: { time: true }, ...(options.scales || {}) },
    axes: [{ stroke: "#6b7280", grid: { stroke: "#f1f5f9" }, space: 70 }, { stroke: "#6b7280", grid: { stroke: "#f1f5f9" }, ...(options.y || {}) }],
    series: [{}, ...series],
    legend: { show: options.legend !== false },
    // The timeline's thick lines would get as thick a cursor point: none there.
    cursor: { drag: { x: true, y: false }, sync: { key: group }, points: { show: options.points !== false } },
    hooks: {
      setSelect: [(u) => { if (u.select.width > 0) zoomed.add(group); }],
      setScale: [(u, key) => { if (key === "x") follow(u, group); }],
      setCursor: options.hover ? [options.hover] : [],
    },
  }, data, box);
  chart.names = names;
  chart.group = group;
  chart.over.addEventListener("dblclick", () => { zoomed.delete(group); });
  charts[id] = chart;
  return chart;
}

// A zoom in one chart of a view is every chart's of it.
let following = false;
function follow(source, group) {
  if (following) return;
  following = true;
  const { min, max } = source.scales.x;
  for (const chart of Object.values(charts)) {
    if (chart !== source && chart.group === group && (chart.scales.x.min !== min || chart.scales.x.max !== max)) {
      chart.setScale("x", { min, max });
    }
  }
  following = false;
}

const stepped = uPlot.paths.stepped({ align: 1 });
const line = (label, stroke, more = {}) => ({ label, stroke, width: 1.5, points: { show: false }, paths: stepped, ...more });
const dots = (label, color) => ({ label, stroke: color, fill: color, paths: () => null, points: { show: true, size: 8, fill: color, stroke: color } });
const color = (i) => PALETTE[i % PALETTE.length];

// Per minute, in buckets sized to the span (about 40 of them, 10 s to an hour each), so an
// afternoon and the last 20 seconds both fill the chart: [bucket starts and the last one's end,
// rates by name].  The last value is repeated at the end so a stepped line gives it its width.
const BUCKETS = [10, 30, 60, 300, 900, 3600];
function perMinute(rows, nameOf, begin, end) {
  const size = BUCKETS.find((b) => b >= (end - begin) / 40) || 3600;
  const first = Math.floor(begin / size) * size, xs = [];
  for (let t = first; t <= end; t += size) xs.push(t);
  const by = {};
  for (const r of rows) {
    const name = nameOf(r);
    if (name === null || r.at < first) continue;
    (by[name] = by[name] || xs.map(() => 0))[Math.min(xs.length - 1, Math.floor((r.at - first) / size))] += 60 / size;
  }
  xs.push(xs[xs.length - 1] + size);
  for (const values of Object.values(by)) values.push(values[values.length - 1]);
  return [xs, by];
}

// What a view of the activity covers: from a little before its first request, a minute at least.
function window_(rows) {
  const end = now(), first = Math.min(end - 60, ...rows.map((r) => r.at));
  return [first - (end - first) * 0.03, end];
}

// -- swaps: which model was resident when, the swaps, the queue, device memory ------------------

function span() {
  const end = now();
  let seconds = Number($("span").value);
  if (!seconds) {  // from the first change recorded, a little before it: short histories fill the width
    const first = Math.min(end - 20, ...timeline.changes.map((c) => c.at), ...timeline.swaps.map((s) => s.at));
    seconds = (end - first) * 1.05;
  }
  return [end - seconds, end];
}

function drawSwaps() {
  if (!showing("swaps")) return;
  const [begin, end] = span();
  const models = state ? Object.keys(state.models) : [...new Set(timeline.changes.map((c) => c.model))];
  const rows = models.length;
  const changes = timeline.changes.filter((c) => c.at <= end);
  const swaps = timeline.swaps.filter((s) => s.at >= begin && s.at <= end);
  const depth = timeline.depth.filter((d) => d[0] <= end);
  const times = new Set([begin, end]);
  for (const c of changes) if (c.at >= begin) times.add(c.at);
  for (const s of swaps) times.add(s.at);
  for (const d of depth) if (d[0] >= begin) times.add(d[0]);
  const xs = [...times].sort((a, b) => a - b);

  // One series per model and state (a thick stepped line is a bar); a state's bar ends at the
  // change that ends it, so both states hold a value there.
  const series = [], data = [xs];
  models.forEach((model, i) => {
    const y = rows - i, own = changes.filter((c) => c.model === model);
    const before = own.filter((c) => c.at < begin);
    let current = before.length ? before[before.length - 1].new : own.length ? own[0].old : (state ? state.models[model].state : "stopped");
    const values = Object.fromEntries(Object.keys(STATE_COLORS).map((s) => [s, xs.map(() => null)]));
    let next = before.length;
    xs.forEach((t, k) => {
      while (next < own.length && own[next].at <= t) {
        if (values[current]) values[current][k] = y;
        current = own[next++].new;
      }
      if (values[current]) values[current][k] = y;
    });
    for (const [name, ys] of Object.entries(values)) {
      if (ys.some((v) => v !== null)) {
        series.push(line(`${model} ${name}`, STATE_COLORS[name], { width: Math.max(6, Math.min(18, 160 / rows)) }));
        data.push(ys);
      }
    }
  });
  const at = new Map(swaps.map((s) => [s.at, s]));
  series.push(dots("swap", "#1d2330"));
  data.push(xs.map((t) => (at.has(t) ? rows + 0.6 : null)));
  const names = (u, splits) => splits.map((v) => (Number.isInteger(v) && v >= 1 && v <= rows ? models[rows - v] : v > rows ? "swaps" : ""));
  plot("chart", "swaps", series, data, {
    height: Math.max(160, 60 + rows * 40), legend: false, points: false,
    scales: { y: { range: [0.3, rows + 1] } },
    y: { splits: () => [...models.map((_, i) => i + 1), rows + 0.6], values: names, size: 130, grid: { show: false } },
    hover: (u) => hover(u, models, swaps),
  });

  // The queue, its own band: how many waited, over the same time.
  let waiting = 0, d = 0;
  const queued = xs.map((t) => { while (d < depth.length && depth[d][0] <= t) waiting = depth[d++][1]; return waiting; });
  plot("chart-queue", "swaps", [line("waiting", "#2563eb", { fill: "rgba(37, 99, 235, .15)" })], [xs, queued], {
    height: 110, legend: false, y: { size: 130, values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? `${v} waiting` : "")) },
    scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
  });
  drawMemory(begin, end, changes);
}

// Device memory: what a probed device really held (by anyone), else what llmswap counted for
// the models resident; the budget as a dashed line.
function drawMemory(begin, end, changes) {
  const devices = Object.entries(state ? state.devices : {});
  if (!devices.length) return;
  const times = new Set([begin, end]);
  for (const samples of Object.values(timeline.memory || {})) for (const m of samples) if (m[0] >= begin) times.add(m[0]);
  for (const c of changes) if (c.at >= begin) times.add(c.at);
  const xs = [...times].sort((a, b) => a - b), gib = 2 ** 30;
  const series = [], data = [xs];
  devices.forEach(([device, budget], i) => {
    const samples = (timeline.memory || {})[device];
    if (samples && samples.length) {
      let j = 0, used = null;
      data.push(xs.map((t) => { while (j < samples.length && samples[j][0] <= t) used = samples[j++][1] / gib; return used; }));
      series.push(line(`${device} in use (measured)`, color(i), { fill: "rgba(124, 58, 237, .08)" }));
    } else {
      data.push(xs.map((t) => counted(device, t, changes) / gib));
      series.push(line(`${device} counted`, color(i)));
    }
    data.push(xs.map(() => budget / gib));
    series.push(line(`${device} budget`, "#9ca3af", { dash: [4, 4], width: 1 }));
  });
  plot("chart-memory", "swaps", series, data, {
    height: 150, y: { size: 130, values: (u, splits) => splits.map((v) => `${v.toFixed(1)} GiB`) },
    scales: { y: { range: (u, min, max) => [0, max * 1.05 || 1] } },
  });
}

function counted(device, t, changes) {
  let total = 0;
  for (const [name, m] of Object.entries(state.models)) {
    if (m.device !== device || !m.memory) continue;
    const last = changes.filter((c) => c.model === name && c.at <= t).pop();
    const current = last ? last.new : (changes.find((c) => c.model === name)?.old ?? m.state);
    if (["starting", "ready", "draining", "stopping"].includes(current)) total += m.memory;
  }
  return total;
}

// Under the cursor: each model's state then, and the nearest swap's cause and times.
function hover(u, models, swaps) {
  const left = u.cursor.left;
  if (left === undefined || left < 0) return;
  const t = u.posToVal(left, "x");
  const states = models.map((model) => {
    const last = timeline.changes.filter((c) => c.model === model && c.at <= t).pop();
    return `${model} ${last ? last.new : "stopped"}`;
  });
  const near = swaps.reduce((best, s) => (!best || Math.abs(s.at - t) < Math.abs(best.at - t) ? s : best), null);
  const swap = near && Math.abs(u.valToPos(near.at, "x") - left) < 12
    ? ` · swap at ${clock(near.at)} (${near.cause}): ${near.unloaded.join(", ") || "-"} → ${near.loaded || "-"}, stop ${secs(near.stop_seconds)}, load ${secs(near.load_seconds)}`
    : "";
  $("chart-hover").textContent = `${clock(t)}: ${states.join(", ")}${swap}`;
}

views.swaps = drawSwaps;
$("span").addEventListener("change", () => { zoomed.delete("swaps"); drawSwaps(); });
setInterval(() => { if (showing("swaps")) drawSwaps(); }, 5000);
window.addEventListener("resize", () => { drawSwaps(); drawActivity(); renderKeys(); });

// -- activity: requests per minute and tokens per second, by model ------------------------------

function drawActivity() {
  if (!showing("activity")) return;
  const rows = activity.filter((r) => r.model !== "-");
  const [begin, end] = window_(rows);
  const [xs, by] = perMinute(rows, (r) => r.model, begin, end);
  const models = Object.keys(by).sort();
  plot("chart-rate", "activity", models.map((m, i) => line(m, color(i), { fill: `${color(i)}22` })), [xs, ...models.map((m) => by[m])], {
    height: 180, scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
  });
  const timed = rows.filter((r) => r.tokens_per_s).sort((a, b) => a.at - b.at);
  const ts = [xs[0], ...timed.map((r) => r.at), xs[xs.length - 1]];
  plot("chart-speed", "activity", models.map((m, i) => dots(m, color(i))),
    [ts, ...models.map((m) => [null, ...timed.map((r) => (r.model === m ? r.tokens_per_s : null)), null])], {
      height: 180, scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
    });
}
views.activity = drawActivity;

// -- keys: each key's requests, tokens, errors and limit hits -----------------------------------

function renderKeys() {
  if (!showing("keys")) return;
  const by = {};
  for (const r of activity) {
    const k = by[r.key] = by[r.key] || { requests: 0, prompt: 0, completion: 0, errors: 0, limited: 0, last: 0 };
    k.requests += 1;
    k.prompt += r.prompt_tokens || 0;
    k.completion += r.completion_tokens || 0;
    if (r.status === 429) k.limited += 1; else if (failed(r)) k.errors += 1;
    k.last = Math.max(k.last, r.at);
  }
  const keys = Object.keys(by).sort();
  $("key-rows").innerHTML = keys.map((name) => { const k = by[name]; return `<tr data-key="${esc(name)}"><td>${name === "-" ? "(no key)" : esc(name)}</td>
    <td>${k.requests}</td><td>${k.prompt}</td><td>${k.completion}</td><td>${k.errors}</td><td>${k.limited}</td><td>${clock(k.last)}</td></tr>`; }).join("");
  const [begin, end] = window_(activity);
  const [xs, requests] = perMinute(activity, (r) => r.key, begin, end);
  plot("chart-keys", "keys", keys.map((k, i) => line(k, color(i))), [xs, ...keys.map((k) => requests[k] || xs.map(() => 0))], {
    height: 180, scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
  });
  const [, errors] = perMinute(activity, (r) => (failed(r) && r.status !== 429 ? r.key : null), begin, end);
  const [, limited] = perMinute(activity, (r) => (r.status === 429 ? r.key : null), begin, end);
  const zeros = xs.map(() => 0);
  plot("chart-key-errors", "keys",
    keys.flatMap((k, i) => [line(`${k} errors`, color(i)), line(`${k} limit hits`, color(i), { dash: [4, 3] })]),
    [xs, ...keys.flatMap((k) => [errors[k] || zeros, limited[k] || zeros])], {
      height: 180, scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    });
}
views.keys = renderKeys;
