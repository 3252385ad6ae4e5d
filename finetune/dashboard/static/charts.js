// Learning-curve charts shared by the experiment page and the run pages: SVG with nice ticks on both
// axes, a margin wide enough for the y labels, a dot for each point of short series (a single
// evaluation is a dot, not an invisible line), and the values of every run under the pointer.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHAR_PX = 7;  // width of a tick label character at 11px, generous so nothing is clipped
const DOTS_UP_TO = 40;  // series with at most this many points get a dot on each

// A value as people read it: integers as integers (rung=1, not 1.000), others with 4 significant digits.
function formatValue(value) {
  if (value === undefined || value === null || value === "") return "";
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  if (Number.isInteger(number)) return String(number);
  const size = Math.abs(number);
  return size >= 1e5 || size < 1e-3 ? number.toExponential(2) : String(Number(number.toPrecision(4)));
}

// Round tick positions covering [low, high]: steps of 1, 2 or 5 times a power of ten.
function niceTicks(low, high, count = 5) {
  const span = high - low;
  const raw = span / Math.max(1, count);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let tick = Math.ceil(low / step - 1e-9) * step; tick <= high + step * 1e-9; tick += step) ticks.push(Number(tick.toPrecision(12)));
  return { ticks, step };
}

function tickLabel(value, step) {
  const size = Math.abs(value);
  if (value !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(1);
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  return value.toFixed(Math.min(decimals, 6));
}

function svgNode(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

// [min, max] without spreading the values into a call (a long run logs more points than a call takes).
function extent(values) {
  return values.reduce(([low, high], value) => [Math.min(low, value), Math.max(high, value)], [Infinity, -Infinity]);
}

function padded(low, high) {
  if (low === high) { const room = Math.abs(low) * 0.05 || 1; return [low - room, high + room]; }
  const room = (high - low) * 0.05;
  return [low - room, high + room];
}

// A chart of one metric. `lines`: [{id, label, color, points: [[step, value], ...]}]; `width` in pixels.
function lineChart(name, lines, width, options = {}) {
  const height = options.height || Math.round(Math.min(420, Math.max(260, width * 0.55)));
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.metric = name;
  box.style.width = `${width}px`;  // the legend wraps inside it
  const title = document.createElement("h3");
  title.textContent = name;
  box.append(title);
  // A diverged value comes as null (JSON has no infinities): it is left out of the drawing.
  const drawn = lines.map((line) => ({ ...line, points: line.points.filter((p) => Number.isFinite(p[1])) })).filter((line) => line.points.length);
  const points = drawn.flatMap((line) => line.points);
  if (!points.length) {
    const empty = document.createElement("p");
    empty.className = "muted";
    empty.textContent = "no values yet";
    box.append(empty);
    return box;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [xLow, xHigh] = extent(xs), [yLow, yHigh] = extent(ys);
  const [x0, x1] = xLow === xHigh ? [xLow - 1, xHigh + 1] : [xLow, xHigh];
  const [y0, y1] = padded(yLow, yHigh);
  const yTicks = niceTicks(y0, y1, Math.max(3, Math.round(height / 60)));
  const xTicks = niceTicks(x0, x1, Math.max(3, Math.round(width / 110)));
  const xLabels = xTicks.ticks.filter((t) => Number.isInteger(t));
  const yLabels = yTicks.ticks.map((t) => tickLabel(t, yTicks.step));
  const left = 14 + CHAR_PX * Math.max(...yLabels.map((label) => label.length));
  const [right, top, bottom] = [16, 10, 38];
  const sx = (x) => left + (width - left - right) * (x - x0) / (x1 - x0);
  const sy = (y) => top + (height - top - bottom) * (1 - (y - y0) / (y1 - y0));
  const svg = svgNode("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${name} by step` });
  yTicks.ticks.forEach((tick, index) => {
    const y = sy(tick).toFixed(1);
    svg.append(svgNode("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
    svg.append(svgNode("text", { x: left - 6, y: Number(y) + 4, "text-anchor": "end", class: "tick y-tick" }, yLabels[index]));
  });
  for (const tick of xLabels) {
    const x = sx(tick).toFixed(1);
    svg.append(svgNode("line", { x1: x, x2: x, y1: height - bottom, y2: height - bottom + 4, class: "axis" }));
    svg.append(svgNode("text", { x, y: height - bottom + 16, "text-anchor": "middle", class: "tick x-tick" }, String(tick)));
  }
  svg.append(svgNode("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
  svg.append(svgNode("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
  svg.append(svgNode("text", { x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle", class: "tick" }, "optimizer step"));
  for (const line of drawn) {
    if (line.points.length > 1) {
      const d = line.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      svg.append(svgNode("path", { d, fill: "none", stroke: line.color, "stroke-width": 2, "data-run": line.id }));
    }
    if (line.points.length <= DOTS_UP_TO) {
      for (const p of line.points) {
        svg.append(svgNode("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 3.5, fill: line.color, class: "point", "data-run": line.id }));
      }
    }
  }
  const cursor = svgNode("line", { y1: top, y2: height - bottom, class: "cursor", visibility: "hidden" });
  const marks = svgNode("g", { class: "marks" });
  svg.append(cursor, marks);
  const tooltip = document.createElement("div");
  tooltip.className = "tooltip";
  tooltip.hidden = true;
  const area = svgNode("rect", { x: left, y: top, width: width - left - right, height: height - top - bottom, fill: "transparent", class: "hover-area" });
  area.addEventListener("mousemove", (event) => {
    const bounds = svg.getBoundingClientRect();
    const step = x0 + (event.clientX - bounds.left - left) / (width - left - right) * (x1 - x0);
    showValuesAt(step, event.clientX - bounds.left);
  });
  area.addEventListener("mouseleave", () => { tooltip.hidden = true; cursor.setAttribute("visibility", "hidden"); marks.replaceChildren(); });
  svg.append(area);

  // The value of every run at the step nearest to `step` (each run's own nearest point).
  function showValuesAt(step, pixelX) {
    const nearest = xs.reduce((best, x) => (Math.abs(x - step) < Math.abs(best - step) ? x : best), xs[0]);
    cursor.setAttribute("x1", sx(nearest)); cursor.setAttribute("x2", sx(nearest)); cursor.setAttribute("visibility", "visible");
    marks.replaceChildren();
    const rows = [];
    for (const line of drawn) {
      const point = line.points.reduce((best, p) => (Math.abs(p[0] - nearest) < Math.abs(best[0] - nearest) ? p : best), line.points[0]);
      marks.append(svgNode("circle", { cx: sx(point[0]), cy: sy(point[1]), r: 5, fill: "none", stroke: line.color, "stroke-width": 2 }));
      rows.push([line, point]);
    }
    rows.sort((a, b) => b[1][1] - a[1][1]);
    tooltip.replaceChildren();
    const head = document.createElement("div");
    head.className = "tooltip-step";
    head.textContent = `step ${nearest}`;
    tooltip.append(head);
    for (const [line, point] of rows) {
      const row = document.createElement("div");
      row.dataset.run = line.id;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = line.color;
      const off = point[0] === nearest ? "" : ` (step ${point[0]})`;
      row.append(swatch, `${line.label}: ${formatValue(point[1])}${off}`);
      tooltip.append(row);
    }
    tooltip.hidden = false;
    tooltip.style.left = `${Math.min(pixelX + 14, Math.max(0, width - 350))}px`;
    tooltip.style.top = `${top + 28}px`;
  }
  box.showValuesAt = (step) => showValuesAt(step, sx(step));  // for tests and keyboard users
  const plot = document.createElement("div");
  plot.className = "plot";
  plot.append(svg, tooltip);
  box.append(plot);
  if (options.legend !== false) {
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const line of drawn) {
      const item = document.createElement("span");
      item.dataset.run = line.id;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = line.color;
      item.append(swatch, line.label);
      legend.append(item);
    }
    box.append(legend);
  }
  return box;
}

// The width of each chart in a container: two side by side where they can be 520 px or more.
function chartWidth(container) {
  const available = Math.max(320, container.clientWidth || document.documentElement.clientWidth - 40);
  const columns = available >= 1080 ? 2 : 1;
  return Math.floor((available - 16 * (columns - 1)) / columns) - 28;  // padding and border, and room for a scrollbar that appears later
}
