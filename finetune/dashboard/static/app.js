// The finetune dashboard: polls the JSON API, draws the runs table and the learning curves (charts.js),
// and sends the same control requests as `finetune ctl` (with the token from the page's URL).
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const POLL_MS = 2000;
const hidden = new Set();  // runs left out of the charts
let unreadable = false;  // the status line shows why the experiment cannot be read
let drawnCharts = "";  // what the charts show now: they are redrawn only when it changes (a hover survives a poll)
let drawnRuns = "";  // what the runs table shows now: redrawn only when it changes (a click or a selection survives a poll)
let latest = null;  // the last answers, to redraw the charts at a new window width

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${TOKEN}`, ...(options.body ? { "Content-Type": "application/json" } : {}) };
  try {
    const response = await fetch(path, { ...options, headers });
    const body = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, body };
  } catch (failure) {
    return { ok: false, status: 0, body: { error: `the dashboard server does not answer (${failure.message})` } };
  }
}

// What an answer that is not ok says: the problems of a rejected request, or the server's error.
function why(result) {
  const problems = (result.body.problems || []).map((p) => (p.path ? `${p.path}: ${p.message}` : p.message));
  return problems.length ? problems.join("; ") : result.body.error || `answer ${result.status}`;
}

// Who applies an accepted request: the controller training now, or the next `finetune run --resume`.
function whenApplied(body) {
  return body.live ? "the running controller applies it at the run's next chunk boundary"
    : "nothing is training this experiment now: the next `finetune run --resume` applies it";
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function knobText(run) {
  const entries = Object.entries(run.knobs || {});
  return entries.length ? entries.map(([key, value]) => `${key.split(".").pop()}=${JSON.stringify(value)}`).join(", ") : run.label;
}

function lineageNote(run) {
  const ancestors = run.lineage || [];
  return ancestors.length ? [element("div", { class: "lineage", title: "made from these runs, first ancestor first" },
    `from ${ancestors.join(" → ")}`)] : [];
}

function number(value) {
  return formatValue(value);
}

// The run's own page (config, events with tracebacks, curves, samples), keeping the token.
function runPageLink(run) {
  return element("a", { href: `/run/${encodeURIComponent(run.run_id)}${location.search}`, class: "run-link", title: "the run's page" },
    element("code", {}, run.run_id));
}

function renderHeader(data) {
  document.getElementById("title").textContent = data.experiment;
  document.getElementById("ranking").textContent = `ranked by ${data.metric} (${data.direction})`;
  const mlflow = document.getElementById("mlflow");
  mlflow.replaceChildren(data.mlflow.web
    ? element("a", { href: data.mlflow.web, target: "_blank" }, "MLflow")
    : element("code", { title: "open MLflow with this command" }, data.mlflow.command || ""));
}

const CONTROLS = ["stop", "resume", "retry", "delete"];

function controlButton(run, action) {
  return element("button", { "data-action": action, "data-run": run.run_id,
    onclick: async () => {
      const result = await api(`/api/runs/${run.run_id}/${action}`, { method: "POST" });
      status(result.ok ? `${action} of ${run.run_id} accepted (request ${result.body.request_id}): ${whenApplied(result.body)}`
        : `${action} of ${run.run_id} refused: ${why(result)}`);
      refresh();
    } }, action);
}

// The buttons of the requests the run's state accepts (the server's table), and clone.
function controls(run) {
  const accepted = run.actions || [];
  return [...CONTROLS.filter((action) => accepted.includes(action)).map((action) => controlButton(run, action)),
    element("button", { "data-action": "clone", "data-run": run.run_id, onclick: () => openClone(run) }, "clone")];
}

// A metric's name that may wrap after its underscores (token_accuracy), so that many columns fit.
function breakable(name) {
  return name.split("_").flatMap((part, index, parts) => (index < parts.length - 1 ? [`${part}_`, document.createElement("wbr")] : [part]));
}

// A column for each eval_conf metric beyond eval_loss (exact_match, rouge_l, a custom one...), before the actions.
function renderMetricColumns(names) {
  const header = document.querySelector("#runs thead tr");
  header.querySelectorAll("th.eval-metric").forEach((cell) => cell.remove());
  const actions = header.lastElementChild;
  for (const name of names) header.insertBefore(element("th", { class: "eval-metric", title: name }, ...breakable(name)), actions);
}

// The base model's value before training (training_args.eval_on_start, step 0), under the run's own.
function baseNote(run, name) {
  const value = (run.base || {})[name];
  return value === undefined ? [] : [element("div", { class: "muted base", title: "before training (step 0)" }, `base ${number(value)}`)];
}

function renderRuns(data) {
  const shown = JSON.stringify([data.runs, data.eval_metrics, data.mlflow, [...hidden]]);
  if (shown === drawnRuns) return;
  drawnRuns = shown;
  renderMetricColumns(data.eval_metrics || []);
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...data.runs.map((run) => {
    const show = element("input", { type: "checkbox", ...(hidden.has(run.run_id) ? {} : { checked: "" }),
      onchange: (event) => { event.target.checked ? hidden.delete(run.run_id) : hidden.add(run.run_id); refresh(); } });
    const progress = element("span", { class: "bar" }, element("span", { style: `width:${100 * run.chunks_done / Math.max(1, run.total_chunks)}%` }));
    const mlflowLink = data.mlflow.web && run.mlflow_run_id
      ? [" ", element("a", { href: `${data.mlflow.web}/#/experiments/0/runs/${run.mlflow_run_id}`, target: "_blank", class: "mlflow-link" }, "MLflow")]
      : [];
    const swatch = element("span", { class: "swatch", style: `background:${run.color}` });
    return element("tr", { "data-run": run.run_id, class: run.rank === 1 && run.value !== null ? "best" : "" },
      element("td", {}, show), element("td", { class: "number" }, String(run.rank)),
      element("td", { class: "run-cell" }, swatch, runPageLink(run), ...mlflowLink),
      element("td", { title: run.label, class: "knobs" }, knobText(run), ...lineageNote(run)),
      element("td", { class: `state-${run.state}`, title: run.error || "" }, run.state),
      element("td", {}, progress, `${run.chunks_done}/${run.total_chunks}`),
      element("td", { class: "number" }, number(run.latest.eval_loss), ...baseNote(run, "eval_loss")),
      element("td", { class: "number" }, number(run.latest.loss)),
      element("td", { class: "number" }, number(run.latest.reward)),
      ...(data.eval_metrics || []).map((name) => element("td", { class: "number", "data-metric": name }, number(run.latest[name]),
        ...baseNote(run, name))),
      element("td", { class: "actions" }, ...controls(run)));
  }));
}

function renderCharts(curves, runs) {
  const container = document.getElementById("charts");
  const shown = runs.filter((run) => !hidden.has(run.run_id));
  const key = JSON.stringify([curves, shown.map((run) => [run.run_id, run.color, knobText(run)]), container.clientWidth]);
  if (key === drawnCharts) return;
  drawnCharts = key;
  const width = chartWidth(container);
  container.replaceChildren(...Object.entries(curves).map(([name, series]) => lineChart(name,
    shown.filter((run) => series[run.run_id]).map((run) => ({ id: run.run_id, label: knobText(run), color: run.color, points: series[run.run_id] })),
    width)));
}

function renderEvents(events) {
  document.getElementById("events").replaceChildren(...events.slice(-30).map((event) => {
    const detail = Object.entries(event).filter(([key]) => !["at", "run_id", "kind", "traceback"].includes(key))
      .map(([key, value]) => `${key}=${typeof value === "number" ? formatValue(value) : JSON.stringify(value)}`).join(", ");
    const run = event.run_id ? [runPageLink({ run_id: event.run_id }), " "] : [];  // a failure's traceback is on the run's page
    return element("li", {}, `${new Date(event.at * 1000).toLocaleTimeString()} `, ...run, `${event.kind} ${detail}`);
  }));
}

function status(text) {
  document.getElementById("status").textContent = text;
}

async function refresh() {
  const [runs, curves, events] = await Promise.all([api("/api/runs"), api("/api/curves"), api("/api/events")]);
  if (!runs.ok) { unreadable = true; status(`cannot read the experiment: ${why(runs)}`); return; }
  if (unreadable) { unreadable = false; status(""); }
  renderHeader(runs.body);
  renderRuns(runs.body);
  latest = { curves: curves.ok ? curves.body : {}, runs: runs.body.runs };
  renderCharts(latest.curves, latest.runs);
  renderEvents(events.ok ? events.body : []);
}

// ---------------------------------------------------------------- clone with changes

function fieldRow(key, value) {
  const row = element("div", { class: "field", "data-key": key });
  row.append(element("input", { name: "key", value: key, placeholder: "training_args.learning_rate" }),
    element("input", { name: "value", value: value === undefined ? "" : (typeof value === "string" ? value : JSON.stringify(value)) }),
    element("p", { class: "error" }));
  return row;
}

async function openClone(run) {
  const dialog = document.getElementById("clone-dialog");
  document.getElementById("clone-parent").textContent = run.run_id;
  document.getElementById("clone-general").textContent = "";
  document.getElementById("clone-warm").checked = false;
  dialog.dataset.run = run.run_id;
  const fields = document.getElementById("clone-fields");
  fields.replaceChildren(...Object.entries(run.knobs || {}).map(([key, value]) => fieldRow(key, value)));
  if (!fields.children.length) fields.append(fieldRow("", ""));
  dialog.showModal();
}

async function submitClone(event) {
  event.preventDefault();
  const dialog = document.getElementById("clone-dialog");
  const rows = [...document.querySelectorAll("#clone-fields .field")];
  const changes = {};
  for (const row of rows) {
    row.querySelector(".error").textContent = "";
    const key = row.querySelector("[name=key]").value.trim();
    if (key) changes[key] = row.querySelector("[name=value]").value;
  }
  const result = await api(`/api/runs/${dialog.dataset.run}/clone`, {
    method: "POST", body: JSON.stringify({ set: changes, warm_start: document.getElementById("clone-warm").checked }) });
  if (result.ok) { dialog.close(); status(`clone requested (request ${result.body.request_id}): ${whenApplied(result.body)}`); refresh(); return; }
  const general = [];
  for (const problem of result.body.problems || [{ path: "", message: why(result) }]) {
    const row = rows.find((r) => r.querySelector("[name=key]").value.trim() === problem.path)
      || rows.find((r) => problem.path.startsWith(r.querySelector("[name=key]").value.trim() + ".") && r.querySelector("[name=key]").value.trim());
    if (row) row.querySelector(".error").textContent = problem.message; else general.push(`${problem.path}: ${problem.message}`);
  }
  document.getElementById("clone-general").textContent = general.join("\n");
}

document.getElementById("clone-form").addEventListener("submit", submitClone);
document.getElementById("clone-add").addEventListener("click", () => document.getElementById("clone-fields").append(fieldRow("", "")));
document.getElementById("clone-cancel").addEventListener("click", () => document.getElementById("clone-dialog").close());
window.addEventListener("resize", () => { if (latest) renderCharts(latest.curves, latest.runs); });
refresh();
setInterval(refresh, POLL_MS);
