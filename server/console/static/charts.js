// Line charts as inline SVG, built node by node (no library, nothing from a CDN).
// Every chart comes with a data table beside it, so its numbers are readable without
// the picture (screen readers, copy and paste).

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 220;
const PAD = { left: 52, right: 16, top: 12, bottom: 34 };

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = String(text);
  return node;
}

// Round numbers for axis labels: 3 significant digits is enough to read a trend.
function short(value) {
  return Number.isInteger(value) ? String(value) : value.toPrecision(3);
}

function extent(values) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (low === high) {
    // A flat series still needs a range to draw in.
    low -= Math.abs(low) * 0.1 || 1;
    high += Math.abs(high) * 0.1 || 1;
  }
  return [low, high];
}

function axes(chart, xs, ys, scale, xLabel) {
  const [x0, x1] = [PAD.left, WIDTH - PAD.right];
  const [y0, y1] = [HEIGHT - PAD.bottom, PAD.top];
  chart.append(svg("line", { x1: x0, y1: y0, x2: x1, y2: y0, class: "axis" }));
  chart.append(svg("line", { x1: x0, y1: y0, x2: x0, y2: y1, class: "axis" }));
  for (const y of [ys[0], (ys[0] + ys[1]) / 2, ys[1]]) {
    chart.append(svg("text", { x: x0 - 6, y: scale.y(y) + 4, class: "tick", "text-anchor": "end" }, short(y)));
  }
  for (const x of xs) {
    chart.append(svg("text", { x: scale.x(x), y: y0 + 16, class: "tick", "text-anchor": "middle" }, xLabel(x)));
  }
}

// Too many x labels overlap; show at most about eight, evenly spaced.
function someOf(xs) {
  const step = Math.max(1, Math.ceil(xs.length / 8));
  return xs.filter((_, i) => i % step === 0 || i === xs.length - 1);
}

/**
 * A line chart of `series` ([{name, points: [[x, y], ...]}]) in a <figure>.
 * `xLabel` formats an x value for the axis (e.g. "v2", a day).
 */
export function lineChart({ title, series, xLabel = short }) {
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  const points = series.flatMap((s) => s.points);
  if (points.length === 0) {
    caption.textContent = `${title}: no data yet`;
    figure.append(caption);
    return figure;
  }
  const xs = [...new Set(points.map((p) => p[0]))].sort((a, b) => a - b);
  const xRange = extent(xs);
  const yRange = extent(points.map((p) => p[1]));
  const scale = {
    x: (x) => PAD.left + ((x - xRange[0]) / (xRange[1] - xRange[0])) * (WIDTH - PAD.left - PAD.right),
    y: (y) => HEIGHT - PAD.bottom - ((y - yRange[0]) / (yRange[1] - yRange[0])) * (HEIGHT - PAD.top - PAD.bottom),
  };
  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart" });
  chart.append(svg("title", {}, title));
  axes(chart, someOf(xs), yRange, scale, xLabel);
  series.forEach((s, i) => {
    s.points.sort((a, b) => a[0] - b[0]); // a line joins its points left to right
    const path = s.points.map(([x, y]) => `${scale.x(x).toFixed(1)},${scale.y(y).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { points: path, class: `line s${i % 6}` }));
    for (const [x, y] of s.points) {
      const dot = svg("circle", { cx: scale.x(x), cy: scale.y(y), r: 3.5, class: `dot s${i % 6}` });
      dot.append(svg("title", {}, `${s.name} at ${xLabel(x)}: ${short(y)}`));
      chart.append(dot);
    }
  });
  figure.append(chart, caption, legend(series));
  return figure;
}

function legend(series) {
  const list = document.createElement("ul");
  list.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch s${i % 6}`;
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, document.createTextNode(s.name));
    list.append(item);
  });
  return list;
}
