// NeuroLens compare page: compare.html?jobs=3,5,8. Loss curves overlaid (one colour per job),
// results side by side, and the configs' differences first. Reads only through the API with the
// helpers of verdict.js (same headers as the dashboard). The address holds the whole choice, so a
// comparison can be bookmarked and shared.
"use strict";

(function (NL) {
  const { read, el, svg, formatNumber, isNumber, verdictOf, reportArtifact, loadReport } = NL.results;

  const MAX_JOBS = 8;
  // Okabe-Ito: told apart with the common colour-vision deficiencies; yellow left out (on white).
  const COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#1b1f24", "#8c8c8c"];
  const EVENT_PAGE = 5000;
  const EVENT_PAGES = 20; // 100 000 events: far beyond a long run at one event every few seconds
  // Where a job's own page lives; the one place to change if the dashboard's address changes.
  const jobUrl = (id) => `./#/jobs/${id}`;
  // The figures a researcher reads first; every other metric follows in name order.
  const FIRST_METRICS = [
    "loss", "train_loss", "val_loss", "test_bleu1_eeg", "test_bleu1_noise", "test_bleu1_shuffled",
    "test_bleu1_eeg_minus_noise", "test_bleu1_eeg_minus_noise_ci_low", "test_bleu1_eeg_minus_noise_ci_high",
    "test_retrieval_top1_eeg", "test_retrieval_top1_chance", "test_rouge1_f_eeg", "test_wer_eeg",
  ];

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------------------------------
  // The choice: ?jobs=3,5,8

  function chosenIds() {
    const raw = new URLSearchParams(location.search).get("jobs");
    if (raw == null || raw.trim() === "") return { ids: [], problem: "" };
    const parts = raw.split(",").map((p) => p.trim()).filter(Boolean);
    const bad = parts.filter((p) => !/^\d{1,9}$/.test(p) || Number(p) < 1);
    if (bad.length) {
      return { ids: [], problem: `Invalid job id ${JSON.stringify(bad[0])} in ?jobs=; expected job numbers separated by commas, e.g. ?jobs=3,5,8.` };
    }
    const ids = [...new Set(parts.map(Number))];
    if (ids.length > MAX_JOBS) {
      return { ids: ids.slice(0, MAX_JOBS), problem: `Showing the first ${MAX_JOBS} of ${ids.length} jobs; compare at most ${MAX_JOBS} at once.` };
    }
    return { ids, problem: "" };
  }

  function showError(id, message) {
    $(id).textContent = message ? `⚠ ${message}` : "";
    $(id).hidden = !message;
  }

  async function renderPicker(chosen) {
    const list = $("picker-list");
    const { data } = await read("api/jobs?limit=1000");
    const jobs = (data || []).slice().sort((a, b) => b.id - a.id);
    if (!jobs.length) {
      list.replaceChildren(el("li", { className: "results-note", text: "No jobs yet; start one on the dashboard." }));
      return;
    }
    list.replaceChildren(...jobs.map((job) => {
      const box = el("input", { type: "checkbox", name: "job", value: String(job.id), "data-testid": "compare-pick" });
      box.checked = chosen.includes(job.id);
      return el("li", {}, el("label", {}, box,
        el("span", { text: `Job ${job.id} · ${job.stage} · ${job.status} · ${job.config && job.config.preset ? `${job.config.preset} · ` : ""}${job.dataset}` })));
    }));
  }

  function onPick(event) {
    event.preventDefault();
    // Oldest first, so the same choice always has the same address.
    const ids = [...$("picker-list").querySelectorAll("input:checked")].map((box) => Number(box.value)).sort((a, b) => a - b);
    if (!ids.length) return showError("picker-error", "Pick at least one job (two or more to compare).");
    if (ids.length > MAX_JOBS) return showError("picker-error", `Pick at most ${MAX_JOBS} jobs; ${ids.length} are ticked.`);
    showError("picker-error", "");
    location.search = `?jobs=${ids.join(",")}`;
  }

  // ---------------------------------------------------------------------------------------------
  // Reads

  async function readEvents(id) {
    const events = [];
    let after = 0;
    for (let page = 0; page < EVENT_PAGES; page += 1) {
      const batch = (await read(`api/jobs/${id}/events?after_id=${after}&limit=${EVENT_PAGE}`)).data || [];
      events.push(...batch);
      if (batch.length < EVENT_PAGE) break;
      after = batch[batch.length - 1].id;
    }
    return events;
  }

  // One point per step, in step order. A resumed job reports the steps after its checkpoint
  // again; the later report (larger event id) is the one its final weights continue from.
  function curve(events, value) {
    const byStep = new Map();
    for (const ev of events) {
      const y = value(ev);
      if (ev.step == null || !isNumber(y)) continue;
      const seen = byStep.get(ev.step);
      if (!seen || seen.id < ev.id) byStep.set(ev.step, { id: ev.id, y });
    }
    return [...byStep.entries()].sort((a, b) => a[0] - b[0]).map(([x, p]) => [x, p.y]);
  }

  // ---------------------------------------------------------------------------------------------
  // Loss chart: SVG drawn at the box's own width (text stays legible on a phone), ticks on both
  // axes, a log axis when the first steps' spike would flatten the rest.

  function niceTicks(lo, hi, count) {
    const span = hi - lo || Math.abs(hi) || 1;
    const raw = span / count;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return ticks;
  }

  function logTicks(lo, hi) {
    const ticks = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e += 1) {
      for (const m of [1, 2, 5]) {
        const t = m * 10 ** e;
        if (t >= lo && t <= hi) ticks.push(Number(t.toPrecision(12)));
      }
    }
    return ticks;
  }

  const tickText = (v) => (Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.01) ? v.toPrecision(2) : String(Number(v.toPrecision(3))));

  function drawLoss(runs) {
    const box = $("loss-chart-box");
    const width = Math.max(280, Math.floor(box.clientWidth || 600));
    const height = width < 500 ? 220 : 300;
    const pad = { left: 52, right: 12, top: 12, bottom: 34 };
    const points = runs.flatMap((r) => [...r.train, ...r.val]);
    if (!points.length) {
      box.replaceChildren(el("p", { className: "results-note", text: "None of these jobs reported a loss yet." }));
      return;
    }
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs);
    const x1 = Math.max(...xs, x0 + 1);
    let y0 = Math.min(...ys);
    let y1 = Math.max(...ys);
    const log = y0 > 0 && y1 / y0 >= 4;
    if (!log && y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const f = log ? Math.log10 : (v) => v;
    const [fy0, fy1] = log ? [Math.log10(y0) - 0.02, Math.log10(y1) + 0.02] : [y0, y1];
    const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
    const sy = (y) => height - pad.bottom - ((f(y) - fy0) / (fy1 - fy0)) * (height - pad.top - pad.bottom);
    const chart = svg("svg", {
      width, height, viewBox: `0 0 ${width} ${height}`, class: "loss-chart", role: "img", "data-testid": "compare-loss-chart",
      "data-scale": log ? "log" : "linear",
      "aria-label": `Loss by step${log ? " (log scale)" : ""}: ` + runs.map((r) => {
        const last = r.train[r.train.length - 1];
        return last ? `job ${r.job.id} ${formatNumber(last[1])} at step ${last[0]}` : `job ${r.job.id} no loss`;
      }).join("; "),
    });
    const yTicks = log ? logTicks(y0, y1) : niceTicks(y0, y1, 5);
    if (log && yTicks.length < 2) yTicks.push(Number(y0.toPrecision(2)), Number(y1.toPrecision(2)));
    for (const t of yTicks) {
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: sy(t), y2: sy(t), class: "grid" }),
        svg("text", { x: pad.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, tickText(t)));
    }
    for (const t of niceTicks(x0, x1, width < 500 ? 4 : 8)) {
      chart.append(svg("line", { x1: sx(t), x2: sx(t), y1: height - pad.bottom, y2: height - pad.bottom + 4, class: "frame" }),
        svg("text", { x: sx(t), y: height - pad.bottom + 16, "text-anchor": "middle", class: "tick" }, String(t)));
    }
    chart.append(
      svg("text", { x: (pad.left + width - pad.right) / 2, y: height - 4, "text-anchor": "middle", class: "tick" }, "step"),
      svg("text", { x: pad.left, y: pad.top - 2, class: "tick" }, log ? "loss (log scale)" : "loss"),
      svg("polyline", {
        points: `${pad.left},${pad.top} ${pad.left},${height - pad.bottom} ${width - pad.right},${height - pad.bottom}`, class: "frame",
      }));
    for (const run of runs) {
      for (const [series, cls] of [[run.train, "curve"], [run.val, "curve val"]]) {
        if (!series.length) continue;
        const path = series.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
        // A lone point is no line: a dot, hollow for validation (often one figure at the end).
        chart.append(svg(series.length === 1 ? "circle" : "polyline", series.length === 1
          ? { cx: sx(series[0][0]), cy: sy(series[0][1]), r: 4, class: `${cls} point`, stroke: run.colour,
            fill: cls === "curve" ? run.colour : "#fff" }
          : { points: path, class: cls, stroke: run.colour, "data-job-id": run.job.id }));
      }
    }
    box.replaceChildren(chart);
  }

  function renderLegend(runs) {
    $("loss-legend").replaceChildren(...runs.flatMap((run) => {
      const name = `Job ${run.job.id} (${run.job.stage}${run.job.config && run.job.config.preset ? `, ${run.job.config.preset}` : ""})`;
      const items = [el("li", { "data-testid": "compare-legend-item", "data-job-id": run.job.id },
        el("span", { className: "swatch", style: `border-top-color: ${run.colour}`, "aria-hidden": "true" }),
        run.train.length ? `${name} training loss` : `${name}: no loss reported`)];
      if (run.val.length) {
        items.push(el("li", {}, el("span", { className: "swatch val", style: `border-top-color: ${run.colour}`, "aria-hidden": "true" }),
          `${name} validation loss`));
      }
      return items;
    }));
  }

  // ---------------------------------------------------------------------------------------------
  // Tables: one column per job, in the order of the address.

  function jobHeader(runs) {
    return el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "" }),
      ...runs.map((run) => el("th", { scope: "col", className: "value" },
        el("span", { className: "swatch-dot", style: `color: ${run.colour}`, "aria-hidden": "true", text: "● " }),
        el("a", { href: jobUrl(run.job.id), text: `Job ${run.job.id}` })))));
  }

  function row(label, values, { differs = false, testid = "compare-row" } = {}) {
    return el("tr", { className: differs ? "differs" : "", "data-testid": testid, "data-key": label },
      // A break allowed after each _ and . so long keys wrap on a phone instead of widening the table.
      el("th", { scope: "row", text: label.replace(/([_.])/g, "$1\u200b") }),
      ...values.map((v) => el("td", { className: "value", text: v })));
  }

  function table(head, rows, label) {
    return el("div", { className: "results-scroll", tabindex: "0", role: "region", "aria-label": label },
      el("table", { className: "results-table" }, head, el("tbody", {}, ...rows)));
  }

  function runTime(job) {
    if (!job.started_at || !job.finished_at) return "–";
    const s = Math.round((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000);
    return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  }

  function mib(bytes) {
    return isNumber(bytes) ? `${(bytes / 1024 ** 2).toFixed(0)} MiB` : "–";
  }

  function renderMetrics(runs, reports) {
    const jobs = runs.map((r) => r.job);
    const summary = [
      row("status", jobs.map((j) => j.status)),
      row("progress", jobs.map((j) => (j.progress && j.progress.total ? `${j.progress.step}/${j.progress.total}` : "–"))),
      row("run time", jobs.map(runTime)),
      row("peak memory", jobs.map((j) => mib((j.memory || {}).peak_rss_bytes))),
    ];
    if (jobs.some((j) => isNumber((j.metrics || {}).test_bleu1_eeg_minus_noise))) {
      summary.push(row("reads the EEG", jobs.map((j) => {
        const m = j.metrics || {};
        if (!isNumber(m.test_bleu1_eeg_minus_noise)) return "–";
        return verdictOf(m, reports.get(j.id)).readsEeg ? "yes" : "no evidence";
      }), { testid: "compare-verdict" }));
    }
    const keys = new Set(jobs.flatMap((j) => Object.keys(j.metrics || {})));
    const ordered = [...FIRST_METRICS.filter((k) => keys.has(k)),
      ...[...keys].filter((k) => !FIRST_METRICS.includes(k)).sort()];
    const metricRows = ordered.map((key) => row(key, jobs.map((j) => {
      const v = (j.metrics || {})[key];
      return v == null ? "–" : isNumber(v) ? formatNumber(v) : String(v);
    }), { testid: "compare-metric" }));
    $("metrics-box").replaceChildren(table(jobHeader(runs), [...summary, ...metricRows], "Results by job"));
  }

  // Nested settings (the encoder's) become dotted keys, so a difference deep inside shows alone.
  function flatten(value, prefix, out) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
    } else {
      out[prefix] = value;
    }
    return out;
  }

  function renderConfig(runs) {
    const flat = runs.map(({ job }) => flatten({
      stage: job.stage, dataset: job.dataset, after: job.after, encoder_artifact: job.encoder_artifact,
      checkpoint_artifact: job.checkpoint_artifact, config: job.config || {},
    }, "", {}));
    const keys = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
    const shown = (f, k) => (k in f && f[k] != null ? (typeof f[k] === "string" ? f[k] : JSON.stringify(f[k])) : "–");
    const differing = keys.filter((k) => new Set(flat.map((f) => shown(f, k))).size > 1);
    const same = keys.filter((k) => !differing.includes(k) && flat.some((f) => f[k] != null));
    const parts = [];
    if (runs.length < 2) parts.push(el("p", { className: "results-note", text: "Pick a second job to see what differs." }));
    else if (!differing.length) parts.push(el("p", { className: "results-note", text: "The configs are the same in every setting." }));
    else {
      parts.push(el("p", { className: "results-note", "data-testid": "compare-diff-count",
        text: `${differing.length} setting${differing.length === 1 ? "" : "s"} differ (marked ≠):` }),
      table(jobHeader(runs), differing.map((k) => row(k, flat.map((f) => shown(f, k)), { differs: true, testid: "compare-config-diff" })),
        "Settings that differ"));
    }
    if (same.length) {
      parts.push(el("details", { "data-testid": "compare-config-same" },
        el("summary", { text: `${same.length} settings the same in ${runs.length > 1 ? "every job" : "this job"}` }),
        table(jobHeader(runs), same.map((k) => row(k, flat.map((f) => shown(f, k)), { testid: "compare-config-row" })),
          "Settings that are the same")));
    }
    $("config-box").replaceChildren(...parts);
  }

  // ---------------------------------------------------------------------------------------------

  async function compare(ids) {
    $("compare-status").textContent = `Reading ${ids.length} job${ids.length === 1 ? "" : "s"}…`;
    const found = await Promise.all(ids.map(async (id) => {
      try {
        const job = await read(`api/jobs/${id}`);
        return { job, events: await readEvents(id) };
      } catch (error) {
        if (error.status === 404) return { missing: id };
        throw error;
      }
    }));
    const missing = found.filter((f) => f.missing).map((f) => f.missing);
    const runs = found.filter((f) => f.job).map((f, i) => ({
      job: f.job, colour: COLOURS[i % COLOURS.length],
      train: curve(f.events, (ev) => ev.loss),
      val: curve(f.events, (ev) => (ev.metrics || {}).val_loss),
    }));
    if (missing.length) showError("compare-error", `No job ${missing.join(", ")} on this server; ${runs.length ? "showing the others" : "pick jobs below"}.`);
    $("compare-status").textContent = runs.length ? `Comparing ${runs.map((r) => `job ${r.job.id}`).join(", ")}.` : "";
    for (const id of ["loss-card", "metrics-card", "config-card"]) $(id).hidden = !runs.length;
    if (!runs.length) return;
    document.title = `Compare jobs ${runs.map((r) => r.job.id).join(", ")} · NeuroLens`;
    drawLoss(runs);
    renderLegend(runs);
    // The verdict a report states (part of no job's metrics) wins over one rebuilt from the metrics.
    const reports = new Map(await Promise.all(runs.filter((r) => reportArtifact(r.job)).map(async (r) => {
      try { return [r.job.id, await loadReport(reportArtifact(r.job))]; } catch (error) { return [r.job.id, null]; }
    })));
    renderMetrics(runs, reports);
    renderConfig(runs);
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => drawLoss(runs), 150);
    });
  }

  async function init() {
    const { ids, problem } = chosenIds();
    showError("compare-error", problem);
    $("picker-form").addEventListener("submit", onPick);
    $("picker").open = ids.length === 0;
    $("picker").querySelector("summary h2").textContent = ids.length ? `Pick jobs to compare (${ids.length} chosen)` : "Pick jobs to compare";
    try {
      await Promise.all([renderPicker(ids), ids.length ? compare(ids) : Promise.resolve()]);
    } catch (error) {
      $("compare-status").textContent = "";
      showError("compare-error", `Cannot read the jobs: ${error.message}`);
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
}(window.NeuroLens));
