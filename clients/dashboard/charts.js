// NeuroLens dashboard: line charts as SVG, drawn by hand (no library, no build step).
// SVG rather than canvas: ticks, marks and labels are elements, so they stay sharp at any zoom,
// screen readers and the browser tests can read them, and CSS styles them. The data is small (a
// few thousand points at most), which SVG draws without effort.
"use strict";

window.NeuroLens = window.NeuroLens || {};

(function charts() {
  const SVG = "http://www.w3.org/2000/svg";
  const HEIGHT = 220;
  const PAD = { left: 64, right: 14, top: 14, bottom: 40 };

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) if (value != null) node.setAttribute(key, String(value));
    if (text != null) node.textContent = text;
    return node;
  }

  // The 1-2-5 step nearest to ``raw``: the steps people read without arithmetic.
  function niceStep(raw) {
    const power = 10 ** Math.floor(Math.log10(raw));
    const fraction = raw / power;
    return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * power;
  }

  function linearTicks(lo, hi, count = 5, integer = false) {
    let step = niceStep((hi - lo) / count || 1);
    if (integer) step = Math.max(1, Math.round(step));
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  // Decades, then finer multiples until there are at least three labels (a span of one decade or
  // less still gets a readable axis); round linear values if even 1..9 leave too few or many.
  function logTicks(lo, hi) {
    const first = Math.floor(Math.log10(lo));
    const last = Math.ceil(Math.log10(hi));
    for (const multiples of [[1], [1, 3], [1, 2, 5], [1, 1.5, 2, 3, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]) {
      const ticks = [];
      for (let k = first; k <= last; k += 1) {
        for (const m of multiples) {
          const v = Number((m * 10 ** k).toPrecision(12));
          if (v >= lo && v <= hi) ticks.push(v);
        }
      }
      if (ticks.length >= 3) return ticks.length <= 9 ? ticks : linearTicks(lo, hi, 5);
    }
    return linearTicks(lo, hi, 4);
  }

  // Seconds in steps a clock reads: 10 s, 30 s, 1 min, 5 min, 15 min, 1 h...
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  function timeTicks(lo, hi, count = 5) {
    const step = TIME_STEPS.find((s) => s >= (hi - lo) / count) || niceStep((hi - lo) / count);
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) ticks.push(v);
    return ticks;
  }

  // Bytes in one binary unit chosen by the largest value, ticks at round numbers of that unit.
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function byteTicks(lo, hi, count = 5) {
    const power = Math.min(UNITS.length - 1, Math.max(0, Math.floor(Math.log(Math.max(hi, 1)) / Math.log(1024))));
    const unit = 1024 ** power;
    const ticks = linearTicks(lo / unit, hi / unit, count).map((v) => v * unit);
    const label = (v) => `${Number((v / unit).toPrecision(4))} ${UNITS[power]}`;
    return { ticks, label };
  }

  /**
   * Draw a line chart into ``container`` (emptied first).
   *
   * @param {HTMLElement} container where the <svg> goes; its width sets the chart's
   * @param {object} spec
   *   series: [{name, className, segments: [[[x, y], ...], ...]}]: each segment is one unbroken
   *     line (an attempt); a gap between segments is never bridged
   *   hlines: [{y, label, className}]: horizontal reference lines (a predicted peak)
   *   marks: [{x, label}]: vertical marks (a pause, a resume)
   *   bands: [{x0, x1, label}]: shaded spans (while a job was paused)
   *   x: {kind: "step" | "time", label}; y: {kind: "value" | "bytes", label, log, fromZero}
   *   empty: the text shown when no series has a point
   * @returns {{log: boolean}} whether the y axis came out logarithmic
   */
  function drawChart(container, spec) {
    const width = Math.max(240, Math.round(container.clientWidth || 320));
    const root = svg("svg", { viewBox: `0 0 ${width} ${HEIGHT}`, width: "100%", height: HEIGHT, "aria-hidden": "true" });
    container.replaceChildren(root);
    const points = spec.series.flatMap((s) => s.segments.flat());
    if (!points.length) {
      root.append(svg("text", { x: PAD.left, y: HEIGHT / 2, class: "chart-empty" }, spec.empty));
      return { log: false };
    }
    const xs = points.map((p) => p[0]).concat((spec.marks || []).map((m) => m.x));
    let x0 = Math.min(...xs);
    let x1 = Math.max(...xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; } // one step reported: put it in the middle
    const ys = points.map((p) => p[1]).concat((spec.hlines || []).map((h) => h.y));
    let y0 = spec.y.fromZero ? 0 : Math.min(...ys);
    let y1 = Math.max(...ys);
    // Log only when the values span a real range and are all above zero: then the first steps'
    // spike takes a decade of the axis instead of flattening every later step.
    const log = Boolean(spec.y.log) && y0 > 0 && y1 / y0 >= 3;
    // Headroom so no line is drawn on the frame.
    if (log) {
      y0 /= 1.15;
      y1 *= 1.15;
    } else {
      const margin = (y1 - y0) * 0.06 || Math.abs(y1) * 0.1 || 1;
      y1 += margin;
      if (!spec.y.fromZero) y0 -= margin;
    }
    const plotW = width - PAD.left - PAD.right;
    const plotH = HEIGHT - PAD.top - PAD.bottom;
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
    const sy = log
      ? (y) => PAD.top + plotH - ((Math.log(y) - Math.log(y0)) / (Math.log(y1) - Math.log(y0))) * plotH
      : (y) => PAD.top + plotH - ((y - y0) / (y1 - y0)) * plotH;

    // Axes: ticks with grid lines and labels, then the axis titles.
    const formatValue = (v) => (Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.01) ? v.toExponential(0) : String(Number(v.toPrecision(3))));
    const yTicks = spec.y.kind === "bytes" ? byteTicks(y0, y1) : { ticks: log ? logTicks(y0, y1) : linearTicks(y0, y1), label: formatValue };
    const xTicks = spec.x.kind === "time"
      ? { ticks: timeTicks(x0, x1, width < 420 ? 3 : 6), label: window.NeuroLens.formatDuration }
      : { ticks: linearTicks(x0, x1, width < 420 ? 3 : 6, true), label: String };
    const yAxis = svg("g", { class: "axis axis-y", "data-testid": "y-axis" });
    for (const v of yTicks.ticks) {
      const y = sy(v);
      const tick = svg("g", { class: "tick", "data-value": v });
      yAxis.append(tick);
      tick.append(svg("line", { class: "grid", x1: PAD.left, x2: width - PAD.right, y1: y, y2: y }),
        svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, yTicks.label(v)));
    }
    const xAxis = svg("g", { class: "axis axis-x", "data-testid": "x-axis" });
    for (const v of xTicks.ticks) {
      const x = sx(v);
      const tick = svg("g", { class: "tick", "data-value": v });
      tick.append(svg("line", { class: "tick-mark", x1: x, x2: x, y1: PAD.top + plotH, y2: PAD.top + plotH + 5 }),
        svg("text", { x, y: PAD.top + plotH + 18, "text-anchor": "middle" }, xTicks.label(v)));
      xAxis.append(tick);
    }
    root.append(yAxis, xAxis,
      svg("line", { class: "frame", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + plotH }),
      svg("line", { class: "frame", x1: PAD.left, x2: width - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH }),
      svg("text", { class: "axis-title", x: PAD.left + plotW / 2, y: HEIGHT - 4, "text-anchor": "middle" }, spec.x.label),
      svg("text", { class: "axis-title", x: 12, y: PAD.top + plotH / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${PAD.top + plotH / 2})` }, spec.y.label + (log ? " (log scale)" : "")));

    for (const band of spec.bands || []) {
      const bx = sx(band.x0);
      root.append(svg("rect", { class: "band", "data-testid": "chart-band", x: bx, y: PAD.top,
        width: Math.max(2, sx(band.x1) - bx), height: plotH }));
      root.lastChild.append(svg("title", {}, band.label));
    }
    for (const mark of spec.marks || []) {
      const x = sx(mark.x);
      const node = svg("g", { class: "mark", "data-testid": "chart-mark" });
      node.append(svg("line", { x1: x, x2: x, y1: PAD.top, y2: PAD.top + plotH }),
        svg("text", { x: x + 3, y: PAD.top + 10 }, mark.label));
      root.append(node);
    }
    for (const line of spec.hlines || []) {
      const y = sy(line.y);
      const node = svg("g", { class: `hline ${line.className}`, "data-testid": "chart-hline" });
      node.append(svg("line", { x1: PAD.left, x2: width - PAD.right, y1: y, y2: y }),
        svg("text", { x: PAD.left + 4, y: y - 4 }, line.label));
      root.append(node);
    }
    for (const series of spec.series) {
      // One path, one "M" per segment: an attempt's line never joins the next attempt's.
      const d = series.segments.filter((seg) => seg.length)
        .map((seg) => seg.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("")).join("");
      if (!d) continue;
      const group = svg("g", { class: `series ${series.className}`, "data-series": series.name });
      group.append(svg("path", { d }));
      // A segment with no length (one report, or all at one step) is no visible line: a dot.
      for (const seg of series.segments) {
        const last = seg[seg.length - 1];
        if (seg.length && seg.every((p) => p[0] === seg[0][0])) group.append(svg("circle", { cx: sx(last[0]), cy: sy(last[1]), r: 3 }));
      }
      root.append(group);
    }
    return { log };
  }

  /**
   * Fill ``list`` with one legend entry per series that has points, plus the given extras.
   *
   * @param {HTMLElement} list a <ul>
   * @param {Array<{name: string, className: string}>} entries what the chart drew
   */
  function drawLegend(list, entries) {
    list.replaceChildren(...entries.map((entry) => {
      const item = document.createElement("li");
      item.dataset.series = entry.name;
      const key = document.createElement("span");
      key.className = `key ${entry.className}`;
      key.setAttribute("aria-hidden", "true");
      item.append(key, ` ${entry.name}`);
      return item;
    }));
  }

  window.NeuroLens.drawChart = drawChart;
  window.NeuroLens.drawLegend = drawLegend;
}());
