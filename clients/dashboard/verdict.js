// NeuroLens results: the Stage 2 verdict panel, and the small helpers the compare page shares
// (reads through the API, number formatting, metric names). Plain JavaScript, no build step.
//
//   NeuroLens.renderVerdict(element, job) -> Promise
//
// renders a finished Stage 2 job into `element`: one sentence first, then EEG, noise and shuffled
// EEG side by side per metric, the bootstrap interval drawn, example predictions from the job's
// report artifact, and every raw key folded away. Calling it again for an unchanged job (a poll)
// does nothing, so the job page can call it on every redraw.
"use strict";

window.NeuroLens = window.NeuroLens || {};

(function (NL) {
  const SVG_NS = "http://www.w3.org/2000/svg";
  // The same per-tab token the dashboard keeps (app.js asks for it on the first 401).
  const TOKEN_KEY = "neurolens-token";

  // ---------------------------------------------------------------------------------------------
  // Reads. The same headers as the dashboard's own requests: JSON wanted, the bearer token when
  // this tab has one, never a cached answer. The page's origin makes them same-origin reads, which
  // the server's cross-site guard lets through.

  class ReadError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  // A server with a token refuses reads without it; a page opened on its own (compare.html in a
  // new tab) asks, as the dashboard does, and keeps the answer for this tab. window.prompt blocks,
  // so reads refused at the same moment find the answer already given and just send again; after
  // a refusal to answer, nothing asks again on this page.
  let declined = false;

  function askForToken(refused) {
    if (declined) return false;
    const why = refused ? "The access token was refused. " : "";
    const given = (window.prompt(`${why}This server needs its access token (NEUROLENS_TOKEN):`) || "").trim();
    if (given) sessionStorage.setItem(TOKEN_KEY, given);
    declined = !given;
    return Boolean(given);
  }

  async function read(path) {
    const sent = authHeaders().Authorization;
    const send = () => fetch(path, { headers: { Accept: "application/json", ...authHeaders() }, cache: "no-store" });
    let response = await send();
    if (response.status === 401) {
      const current = authHeaders().Authorization;
      if ((current && current !== sent) || askForToken(Boolean(sent))) response = await send();
    }
    const text = await response.text();
    if (!response.ok) {
      let detail = text;
      try { detail = JSON.parse(text).detail ?? text; } catch (error) { /* a plain-text answer */ }
      throw new ReadError(response.status, `${path} answered ${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    try {
      return JSON.parse(text);
    } catch (error) {
      throw new ReadError(response.status, `${path} is not JSON: ${error.message}`);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // DOM and numbers

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value == null) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (text != null) node.textContent = text;
    return node;
  }

  // Scores lie in [0, 1] (WER can pass 1): three decimals tell runs apart without noise digits.
  function formatNumber(value, digits = 3) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "–";
    if (Number.isInteger(value) && Math.abs(value) >= 1) return String(value);
    if (value !== 0 && Math.abs(value) < 0.001) return value.toExponential(1);
    return value.toFixed(digits).replace("-", "−");
  }

  // A signed difference ("0.09", "−0.03") with two decimals, as the sentence reads.
  const signed = (value) => formatNumber(value, 2);

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  // ---------------------------------------------------------------------------------------------
  // What the table shows: metric keys of the shared contract, `test_<metric>_<input>`. A row is
  // drawn only when the job has one of its keys, so older reports (no retrieval, no CER) still fit.

  const INPUTS = [["eeg", "EEG"], ["noise", "Noise"], ["shuffled", "Shuffled EEG"]];
  const METRIC_ROWS = [
    { metric: "bleu1", label: "BLEU-1", control: ["test_bleu1_length_only", "length only"] },
    { metric: "bleu2", label: "BLEU-2" },
    { metric: "bleu3", label: "BLEU-3" },
    { metric: "bleu4", label: "BLEU-4" },
    // The trainer names it rouge1_f1; the shared contract wrote rouge1_f: either is read.
    { metric: ["rouge1_f1", "rouge1_f"], label: "ROUGE-1 F", control: ["test_rouge1_length_only", "length only"] },
    { metric: "wer", label: "WER", lower: true },
    { metric: "cer", label: "CER", lower: true },
    { metric: "distinct", label: "Distinct", note: "share of different predictions" },
    { metric: "retrieval_top1", label: "Retrieval top-1", control: ["test_retrieval_top1_chance", "chance"] },
    { metric: "retrieval_top5", label: "Retrieval top-5", control: ["test_retrieval_top5_chance", "chance"] },
    { metric: "content_bleu1", label: "Content-word BLEU-1" },
    { metric: "content_rouge1", label: "Content-word ROUGE-1" },
  ];
  const DIFF = "test_bleu1_eeg_minus_noise";

  // The sentence when the report has none of its own (reports before the verdict was written):
  // the paired bootstrap interval of BLEU-1 from EEG minus BLEU-1 from noise decides.
  function sentenceFromMetrics(metrics) {
    const diff = metrics[DIFF];
    const low = metrics[`${DIFF}_ci_low`];
    const high = metrics[`${DIFF}_ci_high`];
    if (![diff, low, high].every(isNumber)) {
      return { readsEeg: false, sentence: "no evidence that the model reads the EEG: this job reported no EEG-minus-noise interval." };
    }
    const interval = `95% interval ${signed(low)}–${signed(high)}`;
    if (low > 0) {
      return { readsEeg: true, sentence: `reads the EEG: BLEU-1 from EEG exceeds noise by ${signed(diff)}, ${interval}` };
    }
    const where = high < 0 ? "lies below zero" : "includes zero";
    return {
      readsEeg: false,
      sentence: `no evidence that the model reads the EEG: BLEU-1 from EEG minus noise is ${signed(diff)}, ${interval} ${where}`,
    };
  }

  function verdictOf(metrics, report, status = "succeeded") {
    const given = report && report.verdict;
    if (given && typeof given.sentence === "string" && given.sentence) {
      return {
        readsEeg: Boolean(given.reads_eeg), sentence: given.sentence,
        advice: Array.isArray(given.advice) ? given.advice.map(String) : [],
      };
    }
    if (status !== "succeeded" && !isNumber(metrics[DIFF])) {
      return { readsEeg: false, sentence: `no verdict yet: the test set is decoded once the job has trained (it is ${status}).`, advice: [] };
    }
    return { ...sentenceFromMetrics(metrics), advice: [] };
  }

  // ---------------------------------------------------------------------------------------------
  // The interval: a horizontal axis spanning zero and both ends, zero marked, the interval as a
  // bar and the estimate as a dot. Sized by its viewBox, so it is as wide as its box allows.

  function intervalChart(diff, low, high) {
    const width = 320;
    const height = 56;
    const pad = 14;
    let lo = Math.min(0, low, diff);
    let hi = Math.max(0, high, diff);
    const span = hi - lo || 0.1;
    lo -= span * 0.15;
    hi += span * 0.15;
    const x = (v) => pad + ((v - lo) / (hi - lo)) * (width - 2 * pad);
    const above = low > 0;
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, class: "interval-chart", role: "img", "data-testid": "verdict-interval",
      "aria-label": `BLEU-1 from EEG minus noise: ${signed(diff)}, 95% interval ${signed(low)} to ${signed(high)}; zero is marked`,
    });
    chart.append(
      svg("line", { x1: pad, x2: width - pad, y1: 24, y2: 24, class: "axis" }),
      svg("line", { x1: x(0), x2: x(0), y1: 8, y2: 40, class: "zero", "data-testid": "verdict-zero" }),
      svg("text", { x: x(0), y: 52, "text-anchor": "middle", class: "tick" }, "0"),
      svg("rect", {
        x: x(low), y: 18, width: Math.max(2, x(high) - x(low)), height: 12, rx: 3,
        class: above ? "bar above" : "bar", "data-testid": "verdict-bar",
      }),
      svg("circle", { cx: x(diff), cy: 24, r: 4.5, class: "estimate" }),
      svg("text", { x: x(low), y: 12, "text-anchor": "middle", class: "tick" }, signed(low)),
    );
    if (signed(high) !== signed(low)) chart.append(svg("text", { x: x(high), y: 12, "text-anchor": "middle", class: "tick" }, signed(high)));
    return chart;
  }

  // ---------------------------------------------------------------------------------------------
  // Tables

  // The row's metric name this job reports (the first of its names with a value), or null.
  function reported(metrics, row) {
    return [].concat(row.metric).find((name) => INPUTS.some(([input]) => isNumber(metrics[`test_${name}_${input}`]))) || null;
  }

  function metricsTable(metrics) {
    const rows = METRIC_ROWS.map((row) => ({ ...row, metric: reported(metrics, row) })).filter((row) => row.metric);
    const hasControl = rows.some((row) => row.control && isNumber(metrics[row.control[0]]));
    const head = el("tr", {},
      el("th", { scope: "col", text: "Metric" }),
      ...INPUTS.map(([, label]) => el("th", { scope: "col", className: "num", text: label })),
      hasControl ? el("th", { scope: "col", className: "num", text: "Control" }) : null);
    if (!rows.length) return el("p", { className: "results-note", text: "No test metrics yet." });
    const body = rows.map((row) => {
      const values = INPUTS.map(([input]) => metrics[`test_${row.metric}_${input}`]);
      // The EEG column is marked when it beats both controls: the reading a researcher looks for.
      const eeg = values[0];
      const rest = values.slice(1).filter(isNumber);
      const wins = isNumber(eeg) && rest.length > 0 && rest.every((v) => (row.lower ? eeg < v : eeg > v));
      const control = row.control && isNumber(metrics[row.control[0]])
        ? `${row.control[1]} ${formatNumber(metrics[row.control[0]])}` : "";
      return el("tr", { "data-testid": "verdict-row", "data-metric": row.metric },
        el("th", { scope: "row", title: row.note }, row.label,
          row.lower ? el("span", { className: "metric-note", text: "lower is better" }) : null),
        ...values.map((value, i) => el("td", {
          className: i === 0 && wins ? "num best" : "num", text: formatNumber(value),
          title: i === 0 && wins ? "EEG beats both controls" : null,
        })),
        hasControl ? el("td", { className: "num control", text: control || "–" }) : null);
    });
    const table = el("table", { className: "results-table", "data-testid": "verdict-table" },
      el("caption", { className: "visually-hidden", text: "Test-set metrics from EEG, from noise and from shuffled EEG" }),
      el("thead", {}, head), el("tbody", {}, ...body));
    return el("div", { className: "results-scroll metrics-scroll", tabindex: "0", role: "region", "aria-label": "Metrics by input" }, table);
  }

  function examplesTable(examples) {
    const columns = [["reference", "Reference"], ["from_eeg", "From EEG"], ["from_noise", "From noise"],
      ["from_shuffled_eeg", "From shuffled EEG"]];
    const rows = examples.map((example) => el("tr", { "data-testid": "verdict-example" },
      ...columns.map(([key, label]) => {
        // A decoder that writes nothing is a finding in itself (an undertrained model): say so.
        const text = String(example[key] ?? "").trim();
        return el("td", { "data-label": label, className: text ? null : "empty", text: text || "(empty)" });
      })));
    return el("div", { className: "results-scroll", tabindex: "0", role: "region", "aria-label": "Example predictions" },
      el("table", { className: "results-table examples-table", "data-testid": "verdict-examples" },
        el("thead", {}, el("tr", {}, ...columns.map(([, label]) => el("th", { scope: "col", text: label })))),
        el("tbody", {}, ...rows)));
  }

  function rawKeys(metrics) {
    const entries = Object.entries(metrics).sort(([a], [b]) => a.localeCompare(b));
    const list = el("dl", { className: "raw-keys" },
      ...entries.flatMap(([key, value]) => [el("dt", { text: key }),
        el("dd", { text: isNumber(value) ? String(Number(value.toPrecision(6))) : JSON.stringify(value) })]));
    return el("details", { className: "raw", "data-testid": "verdict-raw" },
      el("summary", { text: `All ${entries.length} metric keys` }), list);
  }

  // ---------------------------------------------------------------------------------------------
  // The report: the job's newest `report` artifact, read once per file (its sha256 never changes).

  const reports = new Map();

  function reportArtifact(job) {
    return (job.artifacts || []).filter((a) => a.kind === "report").sort((a, b) => b.id - a.id)[0] || null;
  }

  function loadReport(artifact) {
    if (!reports.has(artifact.sha256)) {
      const pending = read(`api/artifacts/${artifact.id}/download`);
      pending.catch(() => reports.delete(artifact.sha256)); // a failed read is tried again next time
      reports.set(artifact.sha256, pending);
    }
    return reports.get(artifact.sha256);
  }

  function render(element, job, report, reportProblem) {
    const metrics = job.metrics || {};
    const verdict = verdictOf(metrics, report, job.status);
    const parts = [
      el("p", { className: verdict.readsEeg ? "verdict-sentence reads" : "verdict-sentence", "data-testid": "verdict-sentence",
        "data-reads-eeg": String(verdict.readsEeg) },
      el("span", { className: "verdict-symbol", "aria-hidden": "true", text: verdict.readsEeg ? "✓ " : "○ " }),
      verdict.sentence.charAt(0).toUpperCase() + verdict.sentence.slice(1)),
    ];
    if (verdict.advice.length) {
      parts.push(el("ul", { className: "verdict-advice", "data-testid": "verdict-advice" },
        ...verdict.advice.map((text) => el("li", { text }))));
    }
    const [diff, low, high] = [DIFF, `${DIFF}_ci_low`, `${DIFF}_ci_high`].map((key) => metrics[key]);
    if ([diff, low, high].every(isNumber)) {
      parts.push(el("figure", { className: "interval" }, intervalChart(diff, low, high),
        el("figcaption", { text: `BLEU-1 from EEG minus noise, ${signed(diff)} (paired bootstrap, 95%); the bar must clear zero.` })));
    }
    parts.push(el("h4", { text: "Test metrics by input" }), metricsTable(metrics));
    if (isNumber(metrics.test_retrieval_p_eeg_vs_shuffled)) {
      parts.push(el("p", { className: "results-note", "data-testid": "verdict-retrieval-p",
        text: `Retrieval, EEG against shuffled EEG: p = ${formatNumber(metrics.test_retrieval_p_eeg_vs_shuffled)}` }));
    }
    parts.push(el("h4", { text: "Example predictions" }));
    const examples = report && Array.isArray(report.examples) ? report.examples : [];
    if (examples.length) parts.push(examplesTable(examples));
    else {
      parts.push(el("p", { className: "results-note", "data-testid": "verdict-examples-missing",
        text: reportProblem ? `No examples: ${reportProblem}` : "The report lists no examples." }));
    }
    parts.push(rawKeys(metrics));
    element.replaceChildren(...parts);
  }

  async function renderVerdict(element, job) {
    if (!element || !job) return;
    element.classList.add("verdict");
    const artifact = reportArtifact(job);
    // Same job, same metrics, same report file: nothing to redraw (the job page calls this on every poll).
    const signature = JSON.stringify([job.id, job.metrics || {}, artifact && artifact.sha256]);
    if (element.dataset.verdictFor === signature) return;
    element.dataset.verdictFor = signature;
    if (!artifact) {
      render(element, job, null, job.status === "succeeded" ? "the job published no report." : "the report is written when the job finishes.");
      return;
    }
    if (!element.childElementCount) {
      element.replaceChildren(el("p", { className: "results-note", text: "Reading the report…" }));
    }
    let report = null;
    let problem = "";
    try {
      report = await loadReport(artifact);
    } catch (error) {
      problem = `the report could not be read (${error.message}).`;
    }
    if (element.dataset.verdictFor !== signature) return; // a newer call drew meanwhile
    render(element, job, report, problem);
    if (problem) delete element.dataset.verdictFor; // the next call reads the report again
  }

  Object.assign(NL, {
    renderVerdict,
    results: { read, el, svg, formatNumber, isNumber, verdictOf, reportArtifact, loadReport },
  });
}(window.NeuroLens));
