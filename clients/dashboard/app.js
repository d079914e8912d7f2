// NeuroLens dashboard: plain JavaScript, no build step, no network beyond this server.
// It polls the JSON API (relative URLs, so it works behind a path prefix too) and redraws.
"use strict";

const POLL_VISIBLE_MS = 2000;
// A background tab still shows fresh numbers when the user comes back (we poll at once on
// visibilitychange), so it only needs to keep the page roughly current.
const POLL_HIDDEN_MS = 15000;
const MAX_EVENTS = 5000; // enough for long runs at one event per few seconds; bounds memory
const SHOWN_EVENTS = 200;

const STATUS_SYMBOLS = {
  queued: "◷", running: "▶", paused: "⏸", succeeded: "✓", failed: "✗", cancelled: "⊘",
};
const REASONS = {
  dependency: "waiting for its Stage 1 job",
  memory: "waiting for free memory",
};
const ACTIONS_ALLOWED = {
  pause: ["queued", "running"],
  resume: ["paused"],
  cancel: ["queued", "running", "paused"],
  retry: ["failed", "cancelled"],
};

const state = {
  jobs: [],
  system: null,
  selectedId: null,
  selected: null,     // the selected job as last read
  selectedEtag: null,
  jobsEtag: null,
  jobsSignature: null,
  encoderArtifacts: null, // every encoder artifact, imported ones too; read only while that choice is shown
  stages: null,       // GET api/presets: the server's stage registry, by stage name
  events: [],
  lastEventId: 0,
  timer: null,
  polling: false,
  pollAgain: false,
};

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, detail) {
    super(flattenDetail(detail) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// Our own errors carry a string detail; FastAPI's body validation sends [{loc, msg}, ...].
function flattenDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      if (d && typeof d === "object") {
        const loc = (d.loc || []).filter((p) => p !== "body").join(".");
        return loc ? `${loc}: ${d.msg}` : String(d.msg);
      }
      return String(d);
    }).join("; ");
  }
  return typeof detail === "object" && detail.msg ? String(detail.msg) : JSON.stringify(detail);
}

// A server with a token (required beyond loopback) wants it on every API request, reads too.
// The page asks once, on the first refusal, and keeps it for this tab only. Polls that are
// refused at the same moment share that one question; after a refusal to answer, reads stop
// asking (they would ask every few seconds) and only a change the user makes asks again.
const TOKEN_KEY = "neurolens-token";
let tokenQuestion = null;
let tokenDeclined = false;

function askForToken(refusedToken) {
  if (!tokenQuestion) {
    tokenQuestion = new Promise((resolve) => {
      const why = refusedToken ? "The access token was refused. " : "";
      const given = window.prompt(`${why}This server needs its access token (NEUROLENS_TOKEN):`);
      if (given && given.trim()) sessionStorage.setItem(TOKEN_KEY, given.trim());
      tokenDeclined = !(given && given.trim());
      resolve(!tokenDeclined);
    }).finally(() => { tokenQuestion = null; });
  }
  return tokenQuestion;
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, { method = "GET", body, etag } = {}, askedForToken = false) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (etag) headers["If-None-Match"] = etag;
  const response = await fetch(path, {
    method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && !askedForToken && (method !== "GET" || !tokenDeclined)) {
    // A question already answered while this request was in flight needs no second one.
    const sent = headers.Authorization;
    const current = authHeaders().Authorization;
    if ((current && current !== sent) || await askForToken(Boolean(sent))) {
      return api(path, { method, body, etag }, true);
    }
  }
  if (response.status === 304) return { notModified: true, etag };
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("application/json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, data && data.detail !== undefined ? data.detail : data);
  return { data, etag: response.headers.get("ETag") };
}

// ---------------------------------------------------------------------------------------------
// Formatting

function formatBytes(n) {
  if (n == null) return "–";
  let value = Number(n);
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (Math.abs(value) < 1024 || unit === "TiB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return "–";
}

function formatDuration(seconds) {
  if (seconds == null || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function formatLoss(value) {
  return typeof value === "number" ? value.toFixed(4) : "–";
}

function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function statusText(job) {
  const reason = job.reason ? ` (${REASONS[job.reason] || job.reason})` : "";
  return `${job.status}${reason}`;
}

// Trainer crashes arrive as "trainer exited with code -9 (signal SIGKILL)"; say what that
// usually means so a researcher knows what to change.
function plainError(error) {
  if (!error) return "";
  const text = String(error);
  if (/SIGKILL|signal 9|code -9|code 137/.test(text)) {
    return `${text}. The system stopped the trainer, most often because the machine ran out of memory; try a smaller preset or batch size.`;
  }
  if (/MemoryError|out of memory/i.test(text)) {
    return `${text}. The trainer ran out of memory; try a smaller preset, batch size or micro_batch_size.`;
  }
  return text;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null) continue;
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && !key.startsWith("aria")) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function progressBar(progress, testid, status) {
  const step = (progress && progress.step) || 0;
  const total = progress && progress.total;
  const wrap = el("div", { className: "progress" });
  const bar = el("progress", { max: total || 1, value: total ? step : 0, "data-testid": testid });
  let label = total ? `${step}/${total} (${Math.round((100 * step) / total)}%)` : "not started";
  if (total && progress.eta_s != null && step < total) label += `, ETA ${formatDuration(progress.eta_s)}`;
  // After the last step the trainer still evaluates and writes its final artifacts, which can
  // take a while on a small machine; say so rather than show a full bar that seems stuck.
  if (total && step >= total && status === "running") label += ", finishing";
  bar.setAttribute("aria-label", label);
  wrap.append(bar, el("span", { className: "progress-text", text: label }));
  return wrap;
}

// The trainer's memory against what the machine has free now: the number that decides whether a
// bigger preset would fit. A job that is not running has no "now", only its recorded peak.
function memoryText(job) {
  const mem = job.memory || {};
  const free = state.system ? ` of ${formatBytes(state.system.memory_available_bytes)} free` : "";
  if (mem.rss_bytes == null && mem.peak_rss_bytes == null) {
    return mem.predicted_peak_bytes ? `predicted ${formatBytes(mem.predicted_peak_bytes)}${free}` : "–";
  }
  if (job.status !== "running" || mem.rss_bytes == null) return `peak ${formatBytes(mem.peak_rss_bytes)}${gpuText(job)}`;
  return `${formatBytes(mem.rss_bytes)} now, peak ${formatBytes(mem.peak_rss_bytes)}${free}${gpuText(job)}`;
}

// A GPU job's CUDA memory beside its RSS: what the tensors hold (allocated) and what the caching
// allocator keeps from the driver (reserved), whose peak is what must fit on the card.
function gpuText(job) {
  const mem = job.memory || {};
  if (mem.gpu_peak_reserved_bytes == null) return "";
  if (job.status !== "running" || mem.gpu_reserved_bytes == null) {
    return ` · GPU peak ${formatBytes(mem.gpu_peak_reserved_bytes)}`;
  }
  return ` · GPU ${formatBytes(mem.gpu_allocated_bytes)} allocated, ${formatBytes(mem.gpu_reserved_bytes)} ` +
    `reserved, peak ${formatBytes(mem.gpu_peak_reserved_bytes)}`;
}

// ---------------------------------------------------------------------------------------------
// Header

function renderSystem() {
  const target = document.querySelector('[data-testid="system-summary"]');
  const s = state.system;
  if (!s) return;
  const gpus = (s.gpus || []).map((g) => `${g.name} (${formatBytes(g.memory_total_bytes - g.memory_used_bytes)} free)`);
  target.textContent = `Server ${s.version} · ${formatBytes(s.memory_available_bytes)} free of ` +
    `${formatBytes(s.memory_total_bytes)} RAM · ${s.cpu_count} CPUs` + (gpus.length ? ` · ${gpus.join(", ")}` : "") +
    ` · ${s.running_jobs} running, ${s.queued_jobs} queued`;
}

function setConnection(message) {
  const target = document.querySelector('[data-testid="connection-status"]');
  target.textContent = message ? `⚠ ${message}` : "";
  target.classList.toggle("offline", Boolean(message));
}

// ---------------------------------------------------------------------------------------------
// Jobs table

// Rows are rebuilt on every poll; put keyboard focus back on the same control of the same job
// so that a keyboard user is not thrown to the top of the page every two seconds.
function focusedJobControl() {
  const active = document.activeElement;
  const row = active && active.closest && active.closest("#jobs-body tr[data-job-id]");
  return row ? { jobId: row.dataset.jobId, testid: active.dataset.testid } : null;
}

function renderJobs() {
  const body = document.getElementById("jobs-body");
  const focus = focusedJobControl();
  const rows = state.jobs.map((job) => {
    const selected = job.id === state.selectedId;
    const link = el("a", { href: `#job-${job.id}`, text: `Job ${job.id}`, "data-testid": "job-link" });
    if (selected) link.setAttribute("aria-current", "true");
    const status = el("span", { className: `status status-${job.status}`, "data-testid": "job-status-cell" },
      el("span", { className: "symbol", "aria-hidden": "true", text: STATUS_SYMBOLS[job.status] || "?" }),
      ` ${statusText(job)}`);
    const row = el("tr", { className: selected ? "selected" : "", "data-testid": "job-row",
      "data-job-id": job.id, "data-status": job.status },
      el("td", { "data-label": "Job" }, link),
      el("td", { "data-label": "Stage", text: job.stage }),
      el("td", { "data-label": "Status" }, status),
      el("td", { "data-label": "Progress" }, progressBar(job.progress, "job-progress", job.status)),
      el("td", { "data-label": "Memory", text: memoryText(job), "data-testid": "job-memory" }),
      el("td", { "data-label": "Loss", text: formatLoss((job.metrics || {}).loss), "data-testid": "job-loss" }),
      el("td", { "data-label": "Tries", text: String(job.attempts ?? 0) }),
      el("td", { "data-label": "Error", className: "error-cell", text: plainError(job.error), "data-testid": "job-error-cell" }));
    // The whole row opens the job for mouse users; keyboard users have the link in the first cell.
    row.addEventListener("click", (event) => {
      if (event.target.closest("a, button")) return;
      location.hash = `job-${job.id}`;
    });
    return row;
  });
  body.replaceChildren(...rows);
  if (focus) {
    const again = body.querySelector(`tr[data-job-id="${focus.jobId}"] [data-testid="${focus.testid}"]`);
    if (again) again.focus();
  }
  document.getElementById("jobs-empty").hidden = state.jobs.length > 0;
  renderStage2Sources();
}

// Keep the user's choice when the options are rebuilt every poll.
function fillSelect(select, options, emptyLabel) {
  // Rebuilding an unchanged list would close a select the user has open on a phone.
  const signature = JSON.stringify(options);
  if (select.dataset.signature === signature) return;
  select.dataset.signature = signature;
  const previous = select.value;
  const nodes = options.map(([value, label]) => el("option", { value: String(value), text: label }));
  if (!nodes.length) nodes.push(el("option", { value: "", text: emptyLabel }));
  select.replaceChildren(...nodes);
  if (options.some(([value]) => String(value) === previous)) select.value = previous;
}

function stage2Source() {
  return document.getElementById("stage2-form").elements.source.value;
}

// Imported (uploaded) encoders belong to no job, so the jobs list does not show them.
async function loadEncoderArtifacts() {
  const { data } = await api("api/artifacts?kind=encoder&limit=1000");
  state.encoderArtifacts = (data.data || []).slice().sort((a, b) => b.id - a.id);
  renderStage2Sources();
}

// Jobs of a stage that produces an encoder (any job while the registry is unknown: the server
// names the stages it expects if the choice is wrong).
function makesEncoder(job) {
  const stage = state.stages && state.stages[job.stage];
  return !state.stages || Boolean(stage && (stage.produces || []).includes("encoder"));
}

function renderStage2Sources() {
  const producers = state.jobs.filter((j) => makesEncoder(j) && !["failed", "cancelled"].includes(j.status));
  fillSelect(document.getElementById("stage2-after"),
    producers.map((j) => [j.id, `Job ${j.id} · ${j.status} · ${j.dataset}`]), "No Stage 1 jobs yet");
  const encoders = [];
  const describe = (art) => [art.id, `Artifact ${art.id} · ${art.job_id == null ? "imported" : `job ${art.job_id}`} · ${art.filename}`];
  if (state.encoderArtifacts) {
    encoders.push(...state.encoderArtifacts.map(describe));
  } else {
    for (const job of state.jobs) {
      for (const art of job.artifacts || []) if (art.kind === "encoder") encoders.push(describe(art));
    }
  }
  fillSelect(document.getElementById("stage2-encoder_artifact"), encoders, "No encoder artifacts yet");
}

// ---------------------------------------------------------------------------------------------
// Job panel

function renderPanel() {
  const panel = document.getElementById("job-panel");
  const job = state.selected;
  panel.hidden = !job;
  if (!job) return;
  document.getElementById("job-heading").textContent = `Job ${job.id} · ${job.stage} on ${job.dataset}`;
  const statusLine = panel.querySelector('[data-testid="job-status"]');
  statusLine.replaceChildren(
    el("span", { className: `status status-${job.status}` },
      el("span", { className: "symbol", "aria-hidden": "true", text: STATUS_SYMBOLS[job.status] || "?" }),
      ` ${statusText(job)}`),
    progressBar(job.progress, "job-panel-progress", job.status));
  for (const button of panel.querySelectorAll("[data-action]")) {
    button.disabled = !ACTIONS_ALLOWED[button.dataset.action].includes(job.status);
  }
  const errorBox = panel.querySelector('[data-testid="job-error"]');
  errorBox.hidden = !job.error;
  errorBox.textContent = job.error ? `⚠ Error: ${plainError(job.error)}` : "";

  const mem = job.memory || {};
  const metrics = job.metrics || {};
  const items = [
    ["Memory now", formatBytes(mem.rss_bytes)],
    ["Peak memory", formatBytes(mem.peak_rss_bytes)],
    ["Predicted peak", formatBytes(mem.predicted_peak_bytes)],
    ["Machine free RAM", state.system ? formatBytes(state.system.memory_available_bytes) : "–"],
    ...(mem.gpu_peak_reserved_bytes != null ? [
      ["GPU allocated now", formatBytes(mem.gpu_allocated_bytes)],
      ["GPU reserved now", formatBytes(mem.gpu_reserved_bytes)],
      ["GPU peak allocated", formatBytes(mem.gpu_peak_allocated_bytes)],
      ["GPU peak reserved", formatBytes(mem.gpu_peak_reserved_bytes)],
    ] : []),
    ["Attempts", String(job.attempts ?? 0)],
    ["Created", formatTime(job.created_at)],
    ["Started", formatTime(job.started_at)],
    ["Finished", formatTime(job.finished_at)],
  ];
  if (job.after != null) items.push(["After job", String(job.after)]);
  if (job.encoder_artifact != null) items.push(["Encoder artifact", String(job.encoder_artifact)]);
  for (const [key, value] of Object.entries(metrics)) {
    items.push([key, typeof value === "number" ? String(Number(value.toPrecision(6))) : JSON.stringify(value)]);
  }
  // key=value pairs separated by spaces wrap at word boundaries on a phone; raw JSON does not.
  items.push(["Config", Object.entries(job.config || {})
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(", ")]);
  panel.querySelector('[data-testid="job-summary"]').replaceChildren(
    ...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));

  renderAttempts(job.attempt_history || []);
  renderArtifacts(job.artifacts || []);
  renderEvents();
  drawCharts();
}

// One row per attempt: a pause, a crash and its retry each show, with the exit and the peak.
function renderAttempts(attempts) {
  const ended = (a) => {
    if (!a.outcome) return "running";
    const exit = a.exit_code != null ? ` (exit ${a.exit_code})` : "";
    return `${a.outcome.replaceAll("_", " ")}${exit}${a.message ? `: ${plainError(a.message)}` : ""}`;
  };
  const rows = attempts.map((a) => el("tr", { "data-testid": "attempt-row" },
    el("td", { "data-label": "#", text: String(a.number) }),
    el("td", { "data-label": "Started", text: formatTime(a.started_at) }),
    el("td", { "data-label": "Steps", text: `${a.start_step} → ${a.end_step ?? "…"}` }),
    el("td", { "data-label": "Peak memory", text: formatBytes(a.peak_rss_bytes) }),
    el("td", { "data-label": "How it ended", text: ended(a) })));
  document.getElementById("attempts-body").replaceChildren(...rows);
  document.querySelector('[data-testid="attempts-table"]').hidden = attempts.length === 0;
  document.getElementById("attempts-empty").hidden = attempts.length > 0;
}

// A plain link cannot carry the token; with one, the file is fetched with it and saved from
// memory (the CLI's `neurolens download` streams to disk and resumes: better for large files).
function downloadLink(art) {
  const link = el("a", {
    href: `api/artifacts/${art.id}/download`, download: art.filename, text: art.filename,
    "data-testid": "artifact-download",
  });
  link.addEventListener("click", async (event) => {
    if (!authHeaders().Authorization) return;
    event.preventDefault();
    const response = await fetch(link.href, { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) return;
    const saved = el("a", { href: URL.createObjectURL(await response.blob()), download: art.filename });
    saved.click();
    setTimeout(() => URL.revokeObjectURL(saved.href), 60000);
  });
  return link;
}

function renderArtifacts(artifacts) {
  const rows = artifacts.map((art) => el("tr", { "data-testid": "artifact-row", "data-artifact-id": art.id },
    el("td", { "data-label": "Kind", text: art.kind }),
    el("td", { "data-label": "File" }, downloadLink(art)),
    el("td", { "data-label": "Size", text: formatBytes(art.size_bytes) }),
    el("td", { "data-label": "sha256" }, el("code", { className: "sha", text: art.sha256, title: art.sha256 }))));
  document.getElementById("artifacts-body").replaceChildren(...rows);
  document.querySelector('[data-testid="artifacts-table"]').hidden = artifacts.length === 0;
  document.getElementById("artifacts-empty").hidden = artifacts.length > 0;
}

function describeEvent(ev) {
  const parts = [];
  if (ev.step != null) parts.push(`step ${ev.step}${ev.total ? `/${ev.total}` : ""}`);
  if (ev.loss != null) parts.push(`loss ${formatLoss(ev.loss)}`);
  if (ev.samples_per_s != null) parts.push(`${ev.samples_per_s.toFixed(1)} samples/s`);
  if (ev.rss_bytes != null) parts.push(`RSS ${formatBytes(ev.rss_bytes)}`);
  if (ev.gpu_reserved_bytes != null) parts.push(`GPU ${formatBytes(ev.gpu_reserved_bytes)} reserved`);
  if (ev.message) parts.push(ev.message);
  return parts.join(" · ");
}

function renderEvents() {
  const list = document.querySelector('[data-testid="event-log"]');
  const shown = state.events.slice(-SHOWN_EVENTS).reverse();
  list.replaceChildren(...shown.map((ev) => el("li", { className: `event event-${ev.kind}`, "data-testid": "event" },
    el("time", { text: formatTime(ev.created_at) }), " ",
    el("strong", { text: ev.kind }), " ", describeEvent(ev))));
}

// ---------------------------------------------------------------------------------------------
// Charts: canvas line plots. Series differ by dash pattern as well as colour, so they read in
// greyscale and for colour-blind users; the canvas aria-label carries the latest values.

function prepareCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 180;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return null; // no 2D canvas (very old or headless browsers): the aria-label still has the numbers
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

// options: formatX / formatY label the axes; yFromZero keeps a memory axis honest (a flat line
// near the top is not "almost out of memory"); note is a short text drawn top right.
function drawLines(canvas, series, { formatX, formatY, emptyText, yFromZero = false, note = "" }) {
  const surface = prepareCanvas(canvas);
  if (!surface) return;
  const { ctx, width, height } = surface;
  const style = getComputedStyle(document.body);
  const ink = style.getPropertyValue("--ink").trim() || "#1b1f24";
  const muted = style.getPropertyValue("--muted").trim() || "#5b6470";
  const pad = { left: 76, right: 12, top: 18, bottom: 24 };
  const points = series.flatMap((s) => s.points);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = muted;
  if (!points.length) {
    ctx.fillText(emptyText, pad.left, height / 2);
    return;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs, x0 + 1);
  let y0 = yFromZero ? 0 : Math.min(...ys);
  let y1 = Math.max(...ys);
  if (yFromZero) y1 *= 1.1; // headroom so the peak line is not drawn on the frame
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 0; }
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

  ctx.strokeStyle = muted;
  ctx.lineWidth = 1;
  ctx.setLineDash([]);
  ctx.beginPath();
  ctx.moveTo(pad.left, pad.top);
  ctx.lineTo(pad.left, height - pad.bottom);
  ctx.lineTo(width - pad.right, height - pad.bottom);
  ctx.stroke();
  ctx.textAlign = "right";
  ctx.fillText(formatY(y1), pad.left - 6, pad.top + 4);
  ctx.fillText(formatY(y0), pad.left - 6, height - pad.bottom);
  ctx.textAlign = "left";
  ctx.fillText(formatX(x0), pad.left, height - 6);
  ctx.textAlign = "right";
  ctx.fillText(formatX(x1), width - pad.right, height - 6);
  if (note) ctx.fillText(note, width - pad.right, 12);
  ctx.textAlign = "left";

  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color || ink;
    ctx.lineWidth = 2;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    if (s.points.length === 1) { // a lone point is no line: mark it so the first report is visible
      ctx.fillStyle = s.color || ink;
      ctx.beginPath();
      ctx.arc(sx(s.points[0][0]), sy(s.points[0][1]), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  ctx.setLineDash([]);
}

function drawCharts() {
  const loss = state.events.filter((ev) => ev.step != null && typeof ev.loss === "number").map((ev) => [ev.step, ev.loss]);
  const lossCanvas = document.getElementById("loss-chart");
  drawLines(lossCanvas, [{ points: loss, color: "#1f5fbf" }], {
    formatX: (x) => `step ${x}`, formatY: (v) => v.toPrecision(3), emptyText: "No loss reported yet",
  });
  const lastLoss = loss.length ? loss[loss.length - 1] : null;
  lossCanvas.setAttribute("aria-label", lastLoss
    ? `Loss chart: ${loss.length} points, latest loss ${formatLoss(lastLoss[1])} at step ${lastLoss[0]}`
    : "Loss chart: no data yet");

  // Memory is plotted against time since the job's first event, not against steps: loading the
  // data and building the model happen before step 1 and are often where memory grows most.
  const timed = state.events.filter((ev) => ev.rss_bytes != null && ev.created_at);
  const t0 = timed.length ? Date.parse(state.events[0].created_at) : 0;
  const at = (ev) => (Date.parse(ev.created_at) - t0) / 1000;
  const rss = timed.map((ev) => [at(ev), ev.rss_bytes]);
  const peak = timed.filter((ev) => ev.peak_rss_bytes != null).map((ev) => [at(ev), ev.peak_rss_bytes]);
  const series = [
    { points: rss, color: "#1f5fbf" },
    { points: peak, color: "#b3261e", dash: [8, 4] },
  ];
  // A GPU job's reserved CUDA memory on the same byte axis (purple), when the trainer reports it.
  const gpu = timed.filter((ev) => ev.gpu_reserved_bytes != null).map((ev) => [at(ev), ev.gpu_reserved_bytes]);
  if (gpu.length) series.push({ points: gpu, color: "#6a3d9a" });
  const free = state.system && state.system.memory_available_bytes;
  const highest = Math.max(0, ...rss.map((p) => p[1]), ...peak.map((p) => p[1]), ...gpu.map((p) => p[1]));
  let note = "";
  if (free && rss.length) {
    // Free RAM is a flat reference line, drawn only when it is near enough to matter; far above,
    // it would squash the trainer's own lines flat, so its value is written instead.
    if (free <= 4 * highest) {
      series.push({ points: [[rss[0][0], free], [rss[rss.length - 1][0], free]], color: "#3d7a2a", dash: [2, 4] });
    } else {
      note = `free RAM ${formatBytes(free)} (off the scale)`;
    }
  }
  const memCanvas = document.getElementById("memory-chart");
  drawLines(memCanvas, series, {
    formatX: (x) => (x ? formatDuration(x) : "start"), formatY: formatBytes,
    emptyText: "No memory reported yet", yFromZero: true, note,
  });
  const lastRss = rss.length ? rss[rss.length - 1] : null;
  memCanvas.setAttribute("aria-label", lastRss
    ? `Memory chart: RSS ${formatBytes(lastRss[1])} after ${formatDuration(lastRss[0])}, peak ` +
      `${formatBytes(peak.length ? peak[peak.length - 1][1] : null)}, machine free RAM ${formatBytes(free)}`
    : "Memory chart: no data yet");
}

// ---------------------------------------------------------------------------------------------
// Polling

async function refreshSelected() {
  if (state.selectedId == null) return;
  const id = state.selectedId;
  const result = await api(`api/jobs/${id}`, { etag: state.selectedEtag });
  if (id !== state.selectedId) return; // the user switched jobs while we waited
  if (result.notModified) return;
  state.selected = result.data;
  state.selectedEtag = result.etag;
  // Events only change when the job does (every report updates the job row), so a 304 above
  // lets us skip this read too.
  for (let page = 0; page < 20; page += 1) {
    const events = await api(`api/jobs/${id}/events?after_id=${state.lastEventId}&limit=500`);
    if (id !== state.selectedId) return;
    const batch = events.data.data || [];
    state.events.push(...batch);
    if (batch.length) state.lastEventId = batch[batch.length - 1].id;
    if (batch.length < 500) break;
  }
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  renderPanel();
}

async function poll() {
  // One poll at a time; a poll asked for meanwhile (a submit, an action, the tab coming back)
  // runs as soon as this one ends instead of being dropped until the next tick.
  if (state.polling) {
    state.pollAgain = true;
    return;
  }
  state.polling = true;
  try {
    const [jobs, system] = await Promise.all([api("api/jobs", { etag: state.jobsEtag }), api("api/system")]);
    if (!jobs.notModified) {
      state.jobs = jobs.data.data || [];
      state.jobsEtag = jobs.etag;
    }
    state.system = system.data;
    if (stage2Source() === "encoder_artifact") await loadEncoderArtifacts();
    renderSystem();
    // Redrawing an unchanged table every two seconds for hours only churns the DOM (and moves a
    // screen reader's place in it); redraw when the listing or the free RAM shown in it changes.
    const signature = state.jobsEtag && `${state.jobsEtag}|${formatBytes(state.system.memory_available_bytes)}|${state.selectedId}`;
    if (!signature || signature !== state.jobsSignature) {
      state.jobsSignature = signature;
      renderJobs();
    }
    await refreshSelected();
    setConnection("");
  } catch (error) {
    if (error instanceof ApiError && error.status === 404 && state.selectedId != null) {
      setConnection(`Job ${state.selectedId} no longer exists.`);
      location.hash = "";
    } else {
      setConnection(error instanceof ApiError ? error.message : "Cannot reach the server; retrying.");
    }
  } finally {
    state.polling = false;
    schedule(state.pollAgain ? 0 : undefined);
    state.pollAgain = false;
  }
}

function schedule(delay) {
  clearTimeout(state.timer);
  state.timer = setTimeout(poll, delay ?? (document.hidden ? POLL_HIDDEN_MS : POLL_VISIBLE_MS));
}

function selectFromHash() {
  const match = /^#job-(\d+)$/.exec(location.hash);
  const id = match ? Number(match[1]) : null;
  if (id === state.selectedId) return;
  state.selectedId = id;
  state.selected = null;
  state.selectedEtag = null;
  state.events = [];
  state.lastEventId = 0;
  document.getElementById("logs-text").textContent = "";
  renderPanel();
  renderJobs();
  if (id != null) {
    refreshSelected().then(() => {
      const heading = document.getElementById("job-heading");
      if (!document.getElementById("job-panel").hidden) heading.focus();
    }).catch((error) => setConnection(error.message));
  }
}

// ---------------------------------------------------------------------------------------------
// Actions and forms

async function runAction(action) {
  const box = document.querySelector('[data-testid="job-action-error"]');
  box.hidden = true;
  try {
    const result = await api(`api/jobs/${state.selectedId}/${action}`, { method: "POST" });
    state.selected = result.data;
    state.selectedEtag = null;
    renderPanel();
    poll();
  } catch (error) {
    box.textContent = `⚠ ${action} failed: ${error.message}`;
    box.hidden = false;
  }
}

function clearErrors(form) {
  for (const node of form.querySelectorAll(".field-error, .form-error")) {
    node.hidden = true;
    node.textContent = "";
  }
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

// Put the server's message next to the field it names; anything else goes under the form.
function showFormError(form, stage, error) {
  const fields = ["encoder_artifact", "after", "dataset", "preset", "steps"];
  let field = null;
  if (Array.isArray(error.detail)) {
    for (const item of error.detail) {
      const loc = (item && item.loc) || [];
      field = fields.find((f) => loc.includes(f)) || field;
    }
  } else {
    const text = error.message.toLowerCase();
    field = fields.find((f) => new RegExp(`\\b${f}\\b`).test(text) || (f === "encoder_artifact" && /encoder artifact|artifact \d+/.test(text))
      || (f === "after" && /job \d+/.test(text))) || null;
  }
  const box = field && form.querySelector(`#${stage}-${field}-error`);
  const target = box || form.querySelector(`#${stage}-form-error`);
  target.textContent = `⚠ ${error.message}`;
  target.hidden = false;
  const input = field && form.querySelector(`#${stage}-${field}`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

async function submitJob(event, stage) {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const values = new FormData(form);
  const config = { preset: values.get("preset") };
  // A number input reports "abc" as an empty value; say so instead of silently sending no
  // steps (which would start a job with the default count).
  const stepsInput = form.elements.steps;
  const stepsText = String(values.get("steps") || "").trim();
  if (!stepsText || stepsInput.validity.badInput) {
    showFormError(form, stage, new ApiError(0, "Invalid steps; enter a whole number greater than zero."));
    return;
  }
  // Sent as typed (a number when it parses) so the server's validator gives its own message.
  config.steps = /^-?\d+$/.test(stepsText) ? Number(stepsText) : stepsText;
  const body = { stage, dataset: String(values.get("dataset") || "").trim(), config };
  if (form.elements.source) { // a stage that starts from an encoder: a Stage 1 job or an artifact
    const source = values.get("source");
    const raw = values.get(source);
    if (!raw) {
      showFormError(form, stage, new ApiError(422, source === "after"
        ? "Choose the Stage 1 job (after) whose encoder to use."
        : "Choose the encoder_artifact to start from."));
      return;
    }
    body[source] = Number(raw);
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const result = await api("api/jobs", { method: "POST", body });
    location.hash = `job-${result.data.id}`;
    poll();
  } catch (error) {
    if (error instanceof ApiError) showFormError(form, stage, error);
    else showFormError(form, stage, new ApiError(0, "Cannot reach the server."));
  } finally {
    button.disabled = false;
  }
}

// Each form names its stage (data-stage); the server's registry gives its title, description,
// presets and default steps.
async function loadPresets() {
  try {
    const { data } = await api("api/presets");
    state.stages = data;
    for (const [stage, info] of Object.entries(data)) {
      const form = document.querySelector(`form[data-stage="${stage}"]`);
      if (!form || !info.presets) continue;
      if (info.title && info.description) form.querySelector("legend").textContent = `${info.title}: ${info.description}`;
      const select = form.elements.preset;
      fillSelect(select, info.presets.map((p) => [p, p]), "tiny");
      select.value = info.presets.includes("tiny") ? "tiny" : info.presets[0];
      const steps = (info.fields || []).find((f) => f.name === "steps");
      if (steps && steps.default != null) form.elements.steps.value = steps.default;
    }
    renderStage2Sources();
  } catch (error) {
    // The built-in forms in index.html still work; the server validates either way.
  }
}

async function loadLogs() {
  const target = document.getElementById("logs-text");
  try {
    const { data } = await api(`api/jobs/${state.selectedId}/logs?tail_bytes=65536`);
    target.textContent = typeof data === "string" && data ? data : "(the log is empty)";
  } catch (error) {
    target.textContent = `⚠ Could not load the log: ${error.message}`;
  }
}

function init() {
  for (const form of document.querySelectorAll("form[data-stage]")) {
    // Not form.dataset: a form's named fields shadow its properties, and these have a "dataset".
    form.addEventListener("submit", (e) => submitJob(e, form.getAttribute("data-stage")));
  }
  for (const radio of document.querySelectorAll('#stage2-form input[name="source"]')) {
    radio.addEventListener("change", () => {
      for (const field of document.querySelectorAll("#stage2-form [data-source]")) {
        field.hidden = field.dataset.source !== radio.form.elements.source.value;
      }
      if (stage2Source() === "encoder_artifact") loadEncoderArtifacts().catch((error) => setConnection(error.message));
    });
  }
  for (const button of document.querySelectorAll("#job-panel [data-action]")) {
    button.addEventListener("click", () => runAction(button.dataset.action));
  }
  document.getElementById("logs-refresh").addEventListener("click", loadLogs);
  document.querySelector('[data-testid="job-close"]').addEventListener("click", (event) => {
    event.preventDefault();
    location.hash = "";
    document.getElementById("jobs-heading").focus();
  });
  window.addEventListener("hashchange", selectFromHash);
  window.addEventListener("resize", () => { if (state.selected) drawCharts(); });
  document.addEventListener("visibilitychange", () => schedule(document.hidden ? undefined : 0));
  loadPresets();
  selectFromHash();
  poll();
}

// A deferred script runs once the document is parsed; the listener covers being loaded without defer.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
