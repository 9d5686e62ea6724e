"use strict";
// The fleet page: hash routes over the coordinator's JSON API, polled every POLL_MS.
//   #/?tag=k=v&tag=k2=v2&state=online   the fleet table (filters in the hash: a view is a link)
//   #/device/<id>             one device: telemetry charts, alerts, results, commands
//   #/jobs, #/jobs/<id>       jobs and their progress
// Every string from a device or the API goes into the page as text (textContent, text
// nodes, SVG attributes of numbers): never innerHTML. The session cookie rides along
// (same origin); it can only read.

const POLL_MS = 3000;
const CHART_POINTS = 240;
const JOB_STATES = ["queued", "sent", "succeeded", "failed", "timed_out", "cancelled"];
const JOB_COLOURS = {
  queued: "#9e9e9e", sent: "#1565c0", succeeded: "#2e7d32",
  failed: "#c62828", timed_out: "#ef6c00", cancelled: "#6d4c41",
};
const SVG_NS = "http://www.w3.org/2000/svg";

let generation = 0;  // a newer route discards the answers meant for an older one
let timer = null;

// -- DOM helpers (text only) ---------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "className") node.className = value;
    else if (key === "href") node.setAttribute("href", value);
    else if (key === "title") node.title = value;
    else node.dataset[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function table(headings, rows) {
  const head = el("tr", null, ...headings.map((h) => el("th", null, h)));
  return el("table", null, el("thead", null, head), el("tbody", null, ...rows));
}

function td(value, className) {
  return el("td", className ? { className } : null, value === null || value === undefined ? "–" : value);
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "never";
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 120) return s + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function deviceLink(id) {
  return el("a", { href: "#/device/" + encodeURIComponent(id) }, id);
}

function tagList(tags) {
  const entries = Object.entries(tags || {}).sort();
  if (!entries.length) return el("span", { className: "muted" }, "–");
  return el("span", null, ...entries.map(([k, v]) => el("span", { className: "tag" }, k + "=" + v)));
}

function show(view) {
  document.getElementById("view").replaceChildren(...view.filter((node) => node !== null));
}

function typing() {
  const active = document.activeElement;
  return active !== null && active.tagName === "INPUT" && document.getElementById("view").contains(active);
}

function problem(text) {
  document.getElementById("error").textContent = text || "";
}

// -- the API -----------------------------------------------------------------------------

class Missing extends Error {}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) {
    location.assign("/login");
    throw new Error("the session has ended: log in again");
  }
  if (response.status === 404) throw new Missing(path);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + message);
  }
  return response.json();
}

async function optional(path) {
  try { return await api(path); } catch (exc) { if (exc instanceof Missing) return null; throw exc; }
}

// The newest telemetry sample of a telemetry message (SPEC §6: {"samples": [...]}).
function lastSample(message) {
  const samples = message && message.body && message.body.samples;
  return Array.isArray(samples) && samples.length ? samples[samples.length - 1] : null;
}

// `summary` is the API's digest of the device's latest telemetry sample (or null).
function summaryOf(device) {
  const s = device.summary || {};
  const tpu = s.tpu || {}, outbox = s.outbox || {};
  return {
    tpuTemp: tpu.temp_c,
    tpuPresent: tpu.present,
    outboxMessages: outbox.messages,
    outboxDropped: outbox.dropped,
    backend: s.backend || device.backend,
  };
}

function alertText(alert) {
  return (alert.code || "") + ": " + (alert.message || "") + " (" + ago(alert.created_ms) + ")";
}

// -- routes ------------------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "device" && parts[1]) return { view: deviceView, arg: parts[1], params };
  if (parts[0] === "jobs" && parts[1]) return { view: jobView, arg: parts[1], params };
  if (parts[0] === "jobs") return { view: jobsView, params };
  return { view: fleetView, params };
}

async function refresh() {
  clearTimeout(timer);
  const mine = ++generation;
  try {
    const current = route();  // inside: a malformed %-escape in the hash is a URIError
    const nodes = await current.view(current.arg, current.params);
    if (mine !== generation) return;
    if (!typing()) show(nodes);  // never replace the filter a person is typing into
    problem("");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (exc) {
    if (mine === generation) problem(String(exc.message || exc));
  }
  if (mine === generation) timer = setTimeout(refresh, POLL_MS);
}

// -- the fleet table ---------------------------------------------------------------------

function fleetFilters(params) {
  const tag = el("input", { className: "tag-filter" });
  tag.id = "filter-tag";
  tag.placeholder = "site=berlin, hw=usb";
  tag.value = params.getAll("tag").join(", ");
  const state = el("select", null, ...["", "online", "offline"].map((s) => {
    const option = el("option", null, s || "any state");
    option.value = s;
    return option;
  }));
  state.id = "filter-state";
  state.value = params.get("state") || "";
  const apply = () => {
    const next = new URLSearchParams();
    for (const pair of tag.value.split(",").map((p) => p.trim()).filter(Boolean)) next.append("tag", pair);
    if (state.value) next.set("state", state.value);
    location.hash = "#/" + (next.toString() ? "?" + next.toString() : "");
  };
  tag.addEventListener("change", apply);
  state.addEventListener("change", apply);
  return el("div", { className: "filters" }, el("label", null, "Tag ", tag), el("label", null, "State ", state));
}

function fleetRow(device) {
  const s = summaryOf(device);
  const online = el("span", { className: device.online ? "online" : "offline" },
    device.enrolled === false ? "removed" : device.online ? "online" : "offline",
    device.flooding ? " · flooding" : null);
  const outbox = s.outboxMessages === undefined || s.outboxMessages === null ? null
    : s.outboxMessages + (s.outboxDropped ? " (" + s.outboxDropped + " dropped)" : "");
  const alert = device.last_alert;
  const row = el("tr", { device: device.device_id },
    el("td", null, deviceLink(device.device_id)),
    el("td", null, tagList(device.tags)),
    el("td", null, online),
    el("td", { title: when(device.last_seen_ms) }, ago(device.last_seen_ms)),
    td(device.agent_version),
    td(s.backend),
    td(typeof s.tpuTemp === "number" ? s.tpuTemp + " °C" : s.tpuPresent === false ? "none" : null, "num"),
    td(outbox, "num"),
    el("td", { className: alert ? "last-alert sev-" + alert.severity : "last-alert" },
      alert ? alertText(alert) : "–"));
  row.className = "device-row";
  return row;
}

async function fleetView(_arg, params) {
  // The API filters: each tag (AND-ed) and the state.
  const query = new URLSearchParams();
  for (const tag of params.getAll("tag")) query.append("tag", tag);
  if (params.get("state")) query.set("state", params.get("state"));
  let devices;
  try {
    devices = (await api("/devices" + (query.toString() ? "?" + query : ""))).devices;
  } catch (exc) {  // a bad filter (400 naming it): keep the filters to correct it
    return [fleetFilters(params), el("p", { className: "error filter-error" }, exc.message)];
  }
  const online = devices.filter((d) => d.online).length;
  const headings = ["device", "tags", "state", "last seen", "agent", "backend", "TPU", "outbox", "last alert"];
  return [
    fleetFilters(params),
    el("p", { className: "muted" }, devices.length + " devices, " + online + " online"),
    devices.length ? table(headings, devices.map(fleetRow)) : el("p", { className: "empty" }, "No device matches."),
  ];
}

// -- one device ----------------------------------------------------------------------------

// A sample's time on the coordinator's clock (SPEC §6.1: it does not jump when the device's
// clock steps), else the device's own clock for samples queued before any estimate.
function sampleTime(sample) {
  return typeof sample.coord_ts_ms === "number" ? sample.coord_ts_ms : sample.ts_ms;
}

// Points [t_ms, value] of each charted series from telemetry messages (oldest first).
function series(messages) {
  const out = { tpu: [], depth: [], latency: [], rate: [] };
  let previous = null;
  let previousT = 0;
  for (const message of messages) {
    for (const sample of (message.body && message.body.samples) || []) {
      const t = sampleTime(sample);
      if (typeof t !== "number") continue;
      if (sample.tpu && typeof sample.tpu.temp_c === "number") out.tpu.push([t, sample.tpu.temp_c]);
      if (sample.outbox && typeof sample.outbox.messages === "number") out.depth.push([t, sample.outbox.messages]);
      if (typeof sample.latency_p50_ms === "number") out.latency.push([t, sample.latency_p50_ms]);
      if (previous && typeof sample.diffusions === "number" && t > previousT) {
        const done = sample.diffusions - previous.diffusions;
        if (done >= 0) out.rate.push([t, (done * 1000) / (t - previousT)]);
      }
      if (typeof sample.diffusions === "number") {
        previous = sample;
        previousT = t;
      }
    }
  }
  for (const key of Object.keys(out)) out[key] = out[key].slice(-CHART_POINTS);
  return out;
}

function chart(name, caption, points, unit) {
  const width = 420, height = 140, pad = 28;
  const figure = el("figure", { chart: name });
  const box = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  box.dataset.series = name;
  box.dataset.points = String(points.length);
  if (points.length) {
    const ts = points.map((p) => p[0]), vs = points.map((p) => p[1]);
    const t0 = Math.min(...ts), t1 = Math.max(...ts);
    let v0 = Math.min(...vs), v1 = Math.max(...vs);
    if (v1 === v0) { v0 -= 1; v1 += 1; }
    const x = (t) => pad + (t1 === t0 ? (width - 2 * pad) / 2 : ((t - t0) / (t1 - t0)) * (width - 2 * pad));
    const y = (v) => height - pad + 10 - ((v - v0) / (v1 - v0)) * (height - 2 * pad);
    const line = svg("polyline", { points: points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ") });
    const top = svg("text", { x: 2, y: 12 }); top.textContent = fmt(v1) + " " + unit;
    const bottom = svg("text", { x: 2, y: height - 4 }); bottom.textContent = fmt(v0) + " " + unit;
    const span = svg("text", { x: width - 150, y: height - 4 });
    span.textContent = new Date(t0).toLocaleTimeString() + " – " + new Date(t1).toLocaleTimeString();
    box.append(line, top, bottom, span);
    for (const p of points.length <= 60 ? points : []) {
      const dot = svg("circle", { cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 2, fill: "#1565c0" });
      const tip = svg("title");  // hover: when and how much
      tip.textContent = new Date(p[0]).toLocaleTimeString() + ": " + fmt(p[1]) + " " + unit;
      dot.append(tip);
      box.append(dot);
    }
  } else {
    const none = svg("text", { x: width / 2 - 40, y: height / 2 }); none.textContent = "no data yet";
    box.append(none);
  }
  figure.append(box, el("figcaption", null, caption + " (" + points.length + " points)"));
  return figure;
}

function fmt(v) {
  return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toFixed(3);
}

function deviceFacts(device, sample) {
  const facts = [
    ["state", device.online ? "online" : "offline"],
    ["tags", tagList(device.tags)],
    ["last seen", when(device.last_seen_ms)],
    ["first seen", when(device.first_seen_ms)],
    ["agent version", device.agent_version || "–"],
    ["backend", device.backend || "–"],
    ["enrolled", device.enrolled === false ? "no (removed)" : "yes"],
  ];
  if (sample) {
    if (sample.tpu) facts.push(["TPU", sample.tpu.present ? "present" + (sample.tpu.temp_c == null ? "" : ", " + sample.tpu.temp_c + " °C") : "absent"]);
    if (sample.outbox) facts.push(["outbox", sample.outbox.messages + " messages, " + sample.outbox.bytes + " bytes, " + sample.outbox.dropped + " dropped"]);
    facts.push(["cpu / load", sample.cpu_percent + " % / " + sample.load1]);
  }
  const list = el("dl", { className: "facts" });
  for (const [name, value] of facts) list.append(el("dt", null, name), el("dd", null, value));
  return list;
}

function alertsTable(alerts) {
  if (!alerts.length) return el("p", { className: "muted" }, "No alerts.");
  return table(["time", "severity", "code", "message"], alerts.map((a) => {
    const body = a.body || {};
    return el("tr", { className: "alert-row" }, td(when(a.created_ms)), td(body.severity, "sev-" + body.severity), td(body.code), td(body.message));
  }));
}

function resultsTable(results) {
  if (!results.length) return el("p", { className: "muted" }, "No results.");
  return table(["time", "job", "graph", "method", "backend", "latency ms", "error bound"], results.map((r) => {
    const b = r.body || {};
    return el("tr", { className: "result-row" }, td(when(r.created_ms)), td(b.job_id), td(b.graph_id), td(b.method), td(b.backend), td(b.latency_ms, "num"), td(b.error_bound, "num"));
  }));
}

function commandsTable(commands) {
  if (!commands.length) return el("p", { className: "muted" }, "No commands.");
  return table(["seq", "sent", "command", "status", "reply"], commands.map((c) => el("tr", { className: "command-row" },
    td(c.seq, "num"), td(when(c.created_ms)), el("td", null, el("pre", null, JSON.stringify(c.command))),
    td(c.status), el("td", null, c.reply ? el("pre", null, JSON.stringify(c.reply)) : "–"))));
}

// Results come oldest first after a cursor (the API has no "latest"): walk on from the last
// one seen, at most RESULT_PAGES pages per poll, and say so until the walk has caught up.
const RESULT_PAGES = 10;
const resultCache = new Map();  // device id -> {next, rows, read, caughtUp}

async function latestResults(id) {
  const cache = resultCache.get(id) || { next: 0, rows: [], read: 0, caughtUp: false };
  for (let page = 0; page < RESULT_PAGES; page++) {
    const answer = await api(`/devices/${encodeURIComponent(id)}/results?since=${cache.next}&limit=100`);
    cache.rows = cache.rows.concat(answer.results).slice(-10);
    cache.read += answer.results.length;
    cache.next = answer.next;
    cache.caughtUp = answer.results.length < 100;
    if (cache.caughtUp) break;
  }
  resultCache.set(id, cache);
  return cache;
}

// The latest telemetry messages (oldest first), each a batch of samples.
async function telemetryHistory(id) {
  const answer = await api(`/devices/${encodeURIComponent(id)}/telemetry?limit=100`);
  return answer.telemetry;
}

async function deviceView(id) {
  const base = "/devices/" + encodeURIComponent(id);
  const device = await optional(base);
  if (device === null) return [el("p", null, el("a", { href: "#/" }, "← all devices")), el("p", { className: "empty" }, "No device " + id + " is enrolled.")];
  const [history, results, commands] = await Promise.all([
    telemetryHistory(id),
    latestResults(id),
    api(base + "/commands?limit=20"),
  ]);
  const points = series(history);
  const title = el("h2", null, "Device ", el("span", { className: "device-id" }, device.device_id));
  return [
    el("p", null, el("a", { href: "#/" }, "← all devices")),
    title,
    deviceFacts(device, lastSample(device.telemetry) || lastSample(history[history.length - 1])),
    el("h2", null, "Telemetry"),
    el("div", { className: "charts" },
      chart("tpu_temp", "TPU temperature", points.tpu, "°C"),
      chart("outbox_depth", "outbox depth (messages)", points.depth, "msg"),
      chart("latency_p50", "diffusion latency p50", points.latency, "ms"),
      chart("diffusion_rate", "diffusions per second", points.rate, "/s")),
    el("h2", null, "Alerts"),
    alertsTable(device.alerts || []),
    el("h2", null, results.caughtUp ? "Results (latest 10)" : `Results (catching up: ${results.read} read, newer ones follow)`),
    resultsTable(results.rows.slice().reverse()),
    el("h2", null, "Commands"),
    commandsTable(commands.commands),
  ];
}

// -- jobs --------------------------------------------------------------------------------

function progressBar(counts) {
  const total = JOB_STATES.reduce((n, s) => n + (counts[s] || 0), 0);
  const bar = svg("svg", { class: "bar", viewBox: "0 0 600 22", preserveAspectRatio: "none" });
  bar.dataset.total = String(total);
  let x = 0;
  for (const state of JOB_STATES) {
    const n = counts[state] || 0;
    if (!n) continue;
    const w = (n / total) * 600;
    const rect = svg("rect", { x: x.toFixed(1), y: 0, width: w.toFixed(1), height: 22, fill: JOB_COLOURS[state] });
    rect.dataset.state = state;
    rect.dataset.count = String(n);
    bar.append(rect);
    x += w;
  }
  if (!total) bar.append(svg("rect", { x: 0, y: 0, width: 600, height: 22, fill: "#eee" }));
  const legend = el("div", { className: "legend" }, ...JOB_STATES.map((s) => el("span", { className: "st-" + s }, "■ " + s + " " + (counts[s] || 0))));
  return el("div", { className: "progress" }, bar, legend);
}

function jobLink(job) {
  return el("a", { href: "#/jobs/" + encodeURIComponent(job.id) }, "job " + job.id);
}

function targetText(target) {
  if (target === "all") return "all devices";
  if (target && target.tags) return Object.entries(target.tags).map(([k, v]) => k + "=" + v).join(", ");
  if (target && target.ids) return target.ids.length + " devices";
  return JSON.stringify(target);
}

async function jobsView() {
  const jobs = (await api("/jobs")).jobs;
  if (!jobs.length) return [el("h2", null, "Jobs"), el("p", { className: "muted" }, "No jobs.")];
  return [el("h2", null, "Jobs"), table(["job", "command", "target", "state", "created", "progress"], jobs.map((j) => el("tr", { className: "job-row", job: String(j.id) },
    el("td", null, jobLink(j)), td(j.command && j.command.cmd), td(targetText(j.target)),
    td(j.state + (j.reason ? " — " + j.reason : "")), td(when(j.created_ms)), el("td", null, progressBar(j.counts || {})))))];
}

async function jobView(id) {
  const job = await optional("/jobs/" + encodeURIComponent(id) + "?limit=1000");
  const back = el("p", null, el("a", { href: "#/jobs" }, "← all jobs"));
  if (job === null) return [back, el("p", { className: "empty" }, "No job " + id + ".")];
  const devices = job.devices || [];
  return [
    back,
    el("h2", null, el("span", { className: "job-id" }, "job " + job.id), " · " + job.state),
    el("p", null, "command ", el("code", null, JSON.stringify(job.command)), " · target " + targetText(job.target) +
      (job.reason ? " · " + job.reason : "")),
    progressBar(job.counts || {}),
    table(["device", "state", "command seq", "sent", "decided", "error"], devices.map((d) => el("tr", { className: "target-row", device: d.device_id },
      el("td", null, deviceLink(d.device_id)), td(d.state, "st-" + d.state), td(d.seq, "num"),
      td(d.sent_ms ? when(d.sent_ms) : null), td(d.decided_ms ? when(d.decided_ms) : null), td(d.error)))),
    job.next ? el("p", { className: "muted" }, "First " + devices.length + " devices shown.") : null,
  ];
}

window.addEventListener("hashchange", refresh);
refresh();
