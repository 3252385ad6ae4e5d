// A run's page: its state, knobs, curves, chunks, events (failures with their tracebacks), generation
// samples where the experiment stores them, and its concrete config. Polls while the run can change.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const RUN_ID = decodeURIComponent(location.pathname.split("/").pop());
const POLL_MS = 3000;
let drawn = "";

function node(tag, attributes = {}, ...children) {
  const made = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) made.setAttribute(key, value);
  for (const child of children) made.append(child);
  return made;
}

function fact(name, ...value) {
  return [node("dt", {}, name), node("dd", { "data-fact": name }, ...value)];
}

function renderFacts(run) {
  document.title = `${run.run_id}: ${run.experiment}`;
  document.getElementById("back").textContent = run.experiment;
  document.getElementById("back").href = `/${location.search}`;
  document.getElementById("run-title").replaceChildren(node("span", { class: "swatch", style: `background:${run.color}` }),
    node("code", {}, run.run_id), ` ${run.label}`);
  const facts = [
    ...fact("state", node("span", { class: `state-${run.state}` }, run.state), run.error ? node("span", { class: "error" }, `: ${run.error}`) : ""),
    ...fact("chunks", `${run.chunks_done}/${run.total_chunks}`),
    ...fact(`${run.metric} (latest)`, formatValue(run.latest[run.metric])),
  ];
  if (run.lineage.length) facts.push(...fact("made from", run.lineage.join(" → ")));
  if (run.mlflow_run_id) {
    facts.push(...fact("MLflow run", run.mlflow.web
      ? node("a", { href: `${run.mlflow.web}/#/experiments/0/runs/${run.mlflow_run_id}`, target: "_blank" }, run.mlflow_run_id)
      : node("code", {}, run.mlflow_run_id)));
  }
  document.getElementById("facts").replaceChildren(...facts);
  document.querySelector("#knobs tbody").replaceChildren(...Object.entries(run.knobs).map(([key, value]) =>
    node("tr", {}, node("td", {}, node("code", {}, key)), node("td", {}, JSON.stringify(value)))));
  if (!Object.keys(run.knobs).length) document.querySelector("#knobs tbody").append(node("tr", {}, node("td", { colspan: 2, class: "muted" }, "no knobs: this run is the config as written")));
}

function renderCurves(run) {
  const container = document.getElementById("charts");
  const key = JSON.stringify([run.curves, run.color, container.clientWidth]);
  if (key === drawn) return;
  drawn = key;
  const width = chartWidth(container);
  const charts = Object.entries(run.curves).map(([name, points]) =>
    lineChart(name, [{ id: run.run_id, label: run.run_id, color: run.color, points }], width, { legend: false }));
  container.replaceChildren(...(charts.length ? charts : [node("p", { class: "muted" }, "no values yet")]));
}

function renderChunks(run) {
  document.querySelector("#chunks tbody").replaceChildren(...run.chunks.map((chunk) => node("tr", { "data-chunk": chunk.chunk },
    node("td", { class: "number" }, String(chunk.chunk)), node("td", { class: "number" }, String(chunk.global_step)),
    node("td", { class: "number" }, formatValue(chunk.seconds)), node("td", { class: "number" }, formatValue(chunk.step_seconds)),
    node("td", { class: "number" }, formatValue(chunk.eval_seconds)),
    node("td", { class: "knobs" }, Object.entries(chunk.metrics).map(([name, value]) => `${name}=${formatValue(value)}`).join(", ")))));
}

// An event's value: numbers as people read them, a dict of metrics as name=value pairs.
function detailText(value) {
  if (typeof value === "number") return formatValue(value);
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return `{${Object.entries(value).map(([key, inner]) => `${key}=${detailText(inner)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

function renderEvents(run) {
  const list = document.getElementById("events");
  list.replaceChildren(...run.events.map((event) => {
    const detail = Object.entries(event).filter(([key]) => !["at", "run_id", "kind", "traceback"].includes(key))
      .map(([key, value]) => `${key}=${detailText(value)}`).join(", ");
    const item = node("li", { class: event.kind === "run_failed" ? "event-failed" : "", "data-kind": event.kind },
      `${new Date(event.at * 1000).toLocaleString()} ${event.kind} ${detail}`);
    if (event.traceback) item.append(node("details", { open: "" }, node("summary", {}, "traceback"), node("pre", { class: "traceback" }, event.traceback)));
    return item;
  }));
  if (!run.events.length) list.replaceChildren(node("li", { class: "muted" }, "no events yet"));
}

function sampleText(value) {
  if (Array.isArray(value) && value.every((m) => m && typeof m === "object" && "content" in m)) {
    return value.map((m) => `${m.role || ""}: ${m.content}`).join("\n");
  }
  return typeof value === "string" ? value : JSON.stringify(value, null, 1);
}

function renderSamples(run) {
  const box = document.getElementById("samples");
  if (run.samples === null) {
    box.replaceChildren(node("p", { class: "muted" }, "this experiment stores no generation samples"));
    return;
  }
  if (!run.samples.length) { box.replaceChildren(node("p", { class: "muted" }, "no samples for this run yet")); return; }
  box.replaceChildren(...run.samples.map((sample) => node("div", { class: "sample" },
    ...Object.entries(sample).filter(([, value]) => value !== null).map(([name, value]) =>
      node("div", { "data-field": name }, node("span", { class: "field-name" }, `${name} `), node("span", { class: "text" }, sampleText(value)))))));
}

async function refresh() {
  let response;
  try {
    response = await fetch(`/api/runs/${encodeURIComponent(RUN_ID)}`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  } catch (failure) {
    document.getElementById("status").textContent = `the dashboard server does not answer (${failure.message})`;
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { document.getElementById("status").textContent = body.error || `answer ${response.status}`; return; }
  document.getElementById("status").textContent = "";
  // Each part is redrawn only when what it shows changed: an open traceback or a hover survives a poll.
  const { curves, chunks, events, samples, config, ...facts } = body;
  if (changed("facts", facts)) renderFacts(body);
  renderCurves(body);
  if (changed("chunks", chunks)) renderChunks(body);
  if (changed("events", events)) renderEvents(body);
  if (changed("samples", samples)) renderSamples(body);
  if (changed("config", config)) document.getElementById("config").textContent = config ? JSON.stringify(config, null, 2) : "(not in the plan)";
  return body;
}

const shown = {};
function changed(part, value) {
  const key = JSON.stringify(value);
  if (shown[part] === key) return false;
  shown[part] = key;
  return true;
}

let current = null;
window.addEventListener("resize", () => { if (current) renderCurves(current); });
refresh().then((body) => { current = body || current; });
setInterval(async () => { current = (await refresh()) || current; }, POLL_MS);
