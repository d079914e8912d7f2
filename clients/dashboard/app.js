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
  delete: ["paused", "succeeded", "failed", "cancelled"], // the server refuses a queued or running job
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
  events: [],         // the selected job's events, by id, each once (see addEvents)
  lastEventId: 0,
  viewShown: false,   // whether selectFromHash has shown a view yet
  configOpen: false,  // the job page's config stays unfolded across redraws once opened
  timer: null,
  noticeTimer: null,
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

// A running job's phase (loading data, training, evaluating...) comes from the trainer as it
// enters each; "finishing" covers a trainer too old to report one after its last step.
function phaseOf(job) {
  if (job.status !== "running") return "";
  if (job.phase) return job.phase;
  const progress = job.progress || {};
  return progress.total && progress.step >= progress.total ? "finishing" : "";
}

function statusText(job) {
  const reason = job.reason ? ` (${REASONS[job.reason] || job.reason})` : "";
  return `${job.status}${reason}`;
}

function statusBadge(job, testid) {
  const phase = phaseOf(job);
  return el("span", { className: `status status-${job.status}`, "data-testid": testid },
    el("span", { className: "symbol", "aria-hidden": "true", text: STATUS_SYMBOLS[job.status] || "?" }),
    ` ${statusText(job)}`,
    phase ? el("span", { className: "phase", "data-testid": "job-phase", text: ` · ${phase}` }) : null);
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

function progressBar(progress, testid) {
  const step = (progress && progress.step) || 0;
  const total = progress && progress.total;
  const wrap = el("div", { className: "progress" });
  const bar = el("progress", { max: total || 1, value: total ? step : 0, "data-testid": testid });
  let label = total ? `${step}/${total} (${Math.round((100 * step) / total)}%)` : "not started";
  if (total && progress.eta_s != null && step < total) label += `, ETA ${formatDuration(progress.eta_s)}`;
  bar.setAttribute("aria-label", label);
  wrap.append(bar, el("span", { className: "progress-text", text: label }));
  return wrap;
}

// The jobs list's memory cell: one short line (the machine's free RAM is in the header).
function memoryShort(job) {
  const mem = job.memory || {};
  const gpu = mem.gpu_peak_reserved_bytes != null ? ` · GPU ${formatBytes(mem.gpu_peak_reserved_bytes)}` : "";
  if (mem.rss_bytes == null && mem.peak_rss_bytes == null) {
    return mem.predicted_peak_bytes ? `predicted ${formatBytes(mem.predicted_peak_bytes)}` : "–";
  }
  if (job.status !== "running" || mem.rss_bytes == null) return `peak ${formatBytes(mem.peak_rss_bytes)}${gpu}`;
  return `${formatBytes(mem.rss_bytes)}, peak ${formatBytes(mem.peak_rss_bytes)}${gpu}`;
}

// The trainer's memory against what the machine has free now: the number that decides whether a
// bigger preset would fit. A job that is not running has no "now", only its recorded peak.
function memoryText(job) {
  const mem = job.memory || {};
  const free = state.system ? ` of ${formatBytes(state.system.memory_available_bytes)} free` : "";
  if (mem.rss_bytes == null && mem.peak_rss_bytes == null) return "not measured yet";
  if (job.status !== "running" || mem.rss_bytes == null) return `peak ${formatBytes(mem.peak_rss_bytes)}`;
  return `${formatBytes(mem.rss_bytes)} now, peak ${formatBytes(mem.peak_rss_bytes)}${free}`;
}

// The prediction admission used, and how the measured peak compares with it.
function predictionText(job) {
  const mem = job.memory || {};
  if (!mem.predicted_peak_bytes) return "–";
  if (!mem.peak_rss_bytes) return formatBytes(mem.predicted_peak_bytes);
  const share = Math.round((100 * mem.peak_rss_bytes) / mem.predicted_peak_bytes);
  return `${formatBytes(mem.predicted_peak_bytes)} (the peak so far is ${share}% of it)`;
}

function machineText() {
  const s = state.system;
  if (!s) return "–";
  return `${formatBytes(s.memory_available_bytes)} free of ${formatBytes(s.memory_total_bytes)} RAM, ${s.cpu_count} CPUs`;
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
    ` · ${s.running_jobs} running, ${s.queued_jobs} queued` + diskText(s.disk);
}

// What NeuroLens takes on disk (job folders and artifacts, each file once) and what is left.
function diskText(disk) {
  if (!disk) return "";
  return ` · disk: ${formatBytes(disk.jobs_bytes + disk.artifacts_bytes)} used by NeuroLens, ` +
    `${formatBytes(disk.free_bytes)} free`;
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

// One row per job; a failed job's error on a second, full-width row, where it can wrap and stay
// readable instead of widening the table past its card.
function renderJobs() {
  const body = document.getElementById("jobs-body");
  const focus = focusedJobControl();
  const rows = state.jobs.flatMap((job) => {
    const link = el("a", { href: jobHref(job.id), text: `Job ${job.id}`, "data-testid": "job-link" });
    const row = el("tr", { className: "job-row", "data-testid": "job-row", "data-job-id": job.id, "data-status": job.status },
      el("td", { "data-label": "Job" }, link),
      el("td", { "data-label": "Stage", text: job.stage }),
      el("td", { "data-label": "Status" }, statusBadge(job, "job-status-cell")),
      el("td", { "data-label": "Progress" }, progressBar(job.progress, "job-progress")),
      el("td", { "data-label": "Memory", className: "memory-cell", text: memoryShort(job), "data-testid": "job-memory" }),
      el("td", { "data-label": "Loss", text: formatLoss((job.metrics || {}).loss), "data-testid": "job-loss" }),
      el("td", { "data-label": "Tries", text: String(job.attempts ?? 0) }));
    const group = [row];
    if (job.error) {
      group.push(el("tr", { className: "error-row", "data-job-id": job.id },
        el("td", { colSpan: 7, "data-label": "Error", className: "error-cell", "data-testid": "job-error-cell" },
          el("span", { className: "visually-hidden", text: `Job ${job.id} error: ` }), plainError(job.error))));
    }
    // The whole row opens the job for mouse users; keyboard users have the link in the first cell.
    for (const tr of group) {
      tr.addEventListener("click", (event) => {
        if (event.target.closest("a, button")) return;
        location.hash = jobHref(job.id);
      });
    }
    return group;
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

// The two views: the jobs list at "#/", one job at "#/jobs/<id>".
function renderView() {
  document.getElementById("jobs-view").hidden = state.selectedId != null;
  document.getElementById("job-panel").hidden = state.selectedId == null;
}

function renderPanel() {
  const panel = document.getElementById("job-panel");
  const job = state.selected;
  const heading = document.getElementById("job-heading");
  const statusLine = panel.querySelector('[data-testid="job-status"]');
  if (!job) { // the job's address was opened and its first read is on the way
    heading.textContent = state.selectedId == null ? "Job" : `Job ${state.selectedId}`;
    statusLine.textContent = "Loading…";
    return;
  }
  heading.textContent = `Job ${job.id} · ${job.stage} on ${job.dataset}`;
  document.title = `Job ${job.id} (${job.status}) · NeuroLens`;
  statusLine.replaceChildren(statusBadge(job, "job-panel-status"), progressBar(job.progress, "job-panel-progress"));
  for (const button of panel.querySelectorAll("[data-action]")) {
    button.disabled = !ACTIONS_ALLOWED[button.dataset.action].includes(job.status);
  }
  const errorBox = panel.querySelector('[data-testid="job-error"]');
  errorBox.hidden = !job.error;
  errorBox.textContent = job.error ? `⚠ Error: ${plainError(job.error)}` : "";

  const link = (id) => el("a", { href: jobHref(id), text: `Job ${id}` });
  const items = [
    ["Memory", memoryText(job), "job-page-memory"],
    ["Predicted peak", predictionText(job)],
    ...(gpuText(job) ? [["GPU", gpuText(job).replace(/^ · GPU /, "")]] : []),
    ["Machine", machineText()],
    ["Attempts", String(job.attempts ?? 0)],
    ["Disk", job.disk_bytes == null ? "–" : formatBytes(job.disk_bytes), "job-page-disk"],
    ["Created", formatTime(job.created_at)],
    ["Started", formatTime(job.started_at)],
    ["Finished", formatTime(job.finished_at)],
  ];
  if (job.after != null) items.push(["After", link(job.after)]);
  if (job.encoder_artifact != null) items.push(["Encoder artifact", String(job.encoder_artifact)]);
  // key=value pairs separated by spaces wrap at word boundaries on a phone; raw JSON does not.
  // Folded after the first few: the full config is two dozen fields.
  const pairs = Object.entries(job.config || {}).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
  const config = el("details", { className: "config", "data-testid": "job-config" },
    el("summary", { text: pairs.slice(0, 3).join(", ") + (pairs.length > 3 ? `, … (${pairs.length - 3} more)` : "") }),
    pairs.join(", "));
  config.open = state.configOpen;
  config.addEventListener("toggle", () => { state.configOpen = config.open; });
  items.push(["Config", config]);
  panel.querySelector('[data-testid="job-summary"]').replaceChildren(
    ...items.flatMap(([k, v, testid]) => [el("dt", { text: k }), el("dd", { "data-testid": testid }, v)]));

  renderResults(job);
  renderAttempts(job.attempt_history || []);
  renderArtifacts(job.artifacts || []);
  renderEvents();
  drawCharts();
}

/**
 * Render flat metrics as a definition list into ``element`` (emptied first).
 *
 * @param {HTMLElement} element the container
 * @param {object} metrics name -> number (or any JSON value)
 */
function renderMetricList(element, metrics) {
  // Pairs flow into as many columns as fit: dozens of short values need not make a long page.
  const list = el("dl", { className: "metrics", "data-testid": "metric-list" });
  for (const [key, value] of Object.entries(metrics)) {
    list.append(el("div", {}, el("dt", { text: key }),
      el("dd", { text: typeof value === "number" ? String(Number(value.toPrecision(6))) : JSON.stringify(value) })));
  }
  element.replaceChildren(list);
}

// A finished Stage 2 job's results are its verdict (verdict.js); any other job with metrics
// shows them as a list, headed by whether they are final.
function renderResults(job) {
  const section = document.getElementById("results");
  const body = document.getElementById("results-body");
  const metrics = job.metrics || {};
  const verdict = window.NeuroLens.renderVerdict;
  section.hidden = !Object.keys(metrics).length;
  if (section.hidden) return body.replaceChildren();
  const finished = job.status === "succeeded";
  document.getElementById("results-heading").textContent = finished ? "Results" : "Latest metrics";
  if (finished && job.stage === "stage2" && verdict) verdict(body, job);
  else renderMetricList(body, metrics);
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
    el("td", { "data-label": "sha256" }, el("code", { className: "sha", text: art.sha256, title: art.sha256 })),
    el("td", { "data-label": "" }, deleteArtifactButton(art))));
  document.getElementById("artifacts-body").replaceChildren(...rows);
  document.querySelector('[data-testid="artifacts-table"]').hidden = artifacts.length === 0;
  const empty = document.getElementById("artifacts-empty");
  empty.hidden = artifacts.length > 0;
  // Checkpoints written between publications live in the job's folder, not in the artifact
  // store; name the newest so nobody waits for it to appear in the table.
  const checkpoints = state.events.filter((ev) => ev.kind === "checkpoint" && ev.step != null);
  const newest = checkpoints.length ? Math.max(...checkpoints.map((ev) => ev.step)) : null;
  empty.textContent = "No artifacts yet: a job publishes its outputs when it finishes (a Stage 1 job " +
    "also its checkpoint when paused)." + (newest != null
    ? ` Its newest checkpoint, step ${newest}, is in the job's folder; it is not an artifact.` : "");
}

function deleteArtifactButton(art) {
  const button = el("button", {
    type: "button", className: "danger small", text: "Delete", "data-testid": "artifact-delete",
    "aria-label": `Delete artifact ${art.id} (${art.filename})`,
  });
  button.addEventListener("click", () => deleteThing(`artifact ${art.id} (${art.filename})`,
    `api/artifacts/${art.id}`, () => poll()));
  return button;
}

// DELETE after the user confirms; the answer (or the refusal, which names what holds the
// thing) is shown in the job page's message line.
async function deleteThing(what, path, done) {
  const box = document.querySelector('[data-testid="job-action-error"]');
  if (!window.confirm(`Delete ${what}? Its files are removed; this cannot be undone.`)) return;
  box.hidden = true;
  try {
    const { data } = await api(path, { method: "DELETE" });
    // The server's message opens with the same figure in bytes; keep only what follows it.
    const more = (data.message || "").replace(/^[^.]*\.\s*/, "");
    showNotice(`Deleted ${what}: ${formatBytes(data.freed_bytes)} freed.` + (more ? ` ${more}` : ""));
    state.jobsEtag = null;
    state.selectedEtag = null;
    done(data);
  } catch (error) {
    box.textContent = `⚠ delete failed: ${error.message}`;
    box.hidden = false;
  }
}

function showNotice(message) {
  const notice = document.querySelector('[data-testid="notice"]');
  notice.textContent = message;
  notice.hidden = !message;
  clearTimeout(state.noticeTimer);
  if (message) state.noticeTimer = setTimeout(() => showNotice(""), 30000);
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
// Charts (drawn by charts.js). The events are kept by id, each once (addEvents); an attempt is
// the run of them from one "started" to the next. Within an attempt points go in step order
// (loss) or time order (memory), and no line joins two attempts: a pause is a gap, marked.

function splitAttempts(events) {
  const attempts = [[]];
  for (const ev of events) {
    if (ev.kind === "started" && attempts[attempts.length - 1].length) attempts.push([]);
    attempts[attempts.length - 1].push(ev);
  }
  return attempts.filter((list) => list.length);
}

// What the mark where attempt ``index`` (0-based) began says: why the one before it ended.
function restartLabel(job, index) {
  const before = (job.attempt_history || [])[index - 1];
  if (!before || !before.outcome) return `attempt ${index + 1}`;
  return before.outcome === "paused" ? "resumed" : `retried (${before.outcome.replaceAll("_", " ")})`;
}

function drawCharts() {
  const job = state.selected;
  if (!job) return;
  const { drawChart, drawLegend } = window.NeuroLens;
  const attempts = splitAttempts(state.events);
  const byX = (a, b) => a[0] - b[0];
  const pointsOf = (pick) => attempts.map((events) => events.map(pick).filter(Boolean).sort(byX));
  // Several reports of one step (the last step is repeated while the trainer evaluates) are one
  // point: the newest.
  const lastPerStep = (segments) => segments.map((seg) => [...new Map(seg.map((p) => [p[0], p])).values()]);
  const present = (segments) => segments.some((seg) => seg.length);

  const train = lastPerStep(pointsOf((ev) => ev.step != null && typeof ev.loss === "number" && [ev.step, ev.loss]));
  const val = lastPerStep(pointsOf((ev) => ev.step != null && ev.metrics && typeof ev.metrics.val_loss === "number"
    && [ev.step, ev.metrics.val_loss]));
  const lossSeries = [
    { name: "training loss", className: "train", segments: train },
    { name: "validation loss", className: "val", segments: val },
  ].filter((series) => present(series.segments));
  const lossMarks = attempts.slice(1).map((events, i) => {
    const attempt = (job.attempt_history || [])[i + 1];
    const first = train[i + 1][0];
    const x = attempt && attempt.start_step != null ? attempt.start_step : first && first[0];
    return x == null ? null : { x, label: restartLabel(job, i + 1) };
  }).filter(Boolean);
  const lossChart = document.getElementById("loss-chart");
  const drawn = drawChart(lossChart, {
    series: lossSeries, marks: present(train) ? lossMarks : [], empty: "No loss reported yet",
    x: { kind: "step", label: "step" }, y: { kind: "value", label: "loss", log: true },
  });
  drawLegend(document.getElementById("loss-legend"), [...lossSeries,
    ...(present(train) && lossMarks.length ? [{ name: "attempt began (pause, retry)", className: "mark" }] : [])]);
  const flat = train.flat();
  const last = flat.length ? attempts.flatMap((events) => events).filter((ev) => typeof ev.loss === "number").pop() : null;
  lossChart.setAttribute("aria-label", last
    ? `Loss chart${drawn.log ? " (log scale)" : ""}: ${flat.length} points, latest loss ${formatLoss(last.loss)} at step ${last.step}`
    : "Loss chart: no data yet");

  // Memory is plotted against time since the job's first event, not against steps: loading the
  // data and building the model happen before step 1 and are often where memory grows most.
  const t0 = state.events.length ? Date.parse(state.events[0].created_at) : 0;
  const at = (ev) => (Date.parse(ev.created_at) - t0) / 1000;
  const rss = pointsOf((ev) => ev.rss_bytes != null && [at(ev), ev.rss_bytes]);
  const peak = pointsOf((ev) => ev.peak_rss_bytes != null && [at(ev), ev.peak_rss_bytes]);
  const gpu = pointsOf((ev) => ev.gpu_reserved_bytes != null && [at(ev), ev.gpu_reserved_bytes]);
  const memSeries = [
    { name: "RSS", className: "rss", segments: rss },
    { name: "peak RSS", className: "peak", segments: peak },
    { name: "GPU reserved", className: "gpu", segments: gpu },
  ].filter((series) => present(series.segments));
  // Between two attempts nothing ran: a shaded gap from the last report to the next start.
  const bands = [];
  const memMarks = [];
  attempts.slice(1).forEach((events, i) => {
    const x0 = at(attempts[i][attempts[i].length - 1]);
    const x1 = at(events[0]);
    bands.push({ x0, x1, label: `not running for ${formatDuration(x1 - x0)}` });
    memMarks.push({ x: x1, label: restartLabel(job, i + 1) });
  });
  const highest = Math.max(0, ...[rss, peak, gpu].map((segments) => Math.max(0, ...segments.flat().map((p) => p[1]))));
  const hlines = [];
  const extras = [];
  const predicted = (job.memory || {}).predicted_peak_bytes;
  if (predicted && present(rss)) {
    hlines.push({ y: predicted, label: `predicted ${formatBytes(predicted)}`, className: "predicted" });
    extras.push({ name: "predicted peak", className: "predicted" });
  }
  const free = state.system && state.system.memory_available_bytes;
  if (free && present(rss) && job.status === "running") {
    // The machine's free RAM is drawn only when near enough to matter; far above, it would squash
    // the trainer's own lines flat, so the legend gives its value instead.
    if (free <= 4 * highest) {
      hlines.push({ y: free, label: `free ${formatBytes(free)}`, className: "free" });
      extras.push({ name: "machine's free RAM", className: "free" });
    } else {
      extras.push({ name: `machine's free RAM: ${formatBytes(free)} (off the scale)`, className: "none" });
    }
  }
  if (bands.length) extras.push({ name: "not running (paused, between attempts)", className: "band" });
  const memChart = document.getElementById("memory-chart");
  drawChart(memChart, {
    series: memSeries, hlines, bands, marks: memMarks, empty: "No memory reported yet",
    x: { kind: "time", label: "time since the job's first event" }, y: { kind: "bytes", label: "memory", fromZero: true },
  });
  drawLegend(document.getElementById("memory-legend"), [...memSeries, ...extras]);
  const lastRss = rss.flat().sort(byX).pop();
  memChart.setAttribute("aria-label", lastRss
    ? `Memory chart: RSS ${formatBytes(lastRss[1])} after ${formatDuration(lastRss[0])}, peak ` +
      `${formatBytes((job.memory || {}).peak_rss_bytes)}, predicted ${formatBytes(predicted)}`
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
    addEvents(batch);
    if (batch.length < 500) break;
  }
  renderPanel();
}

// Keep each event once, in id order, whatever order pages arrive in: two reads of the same page
// (a poll and a click at once) once drew the charts' lines back from step 1100 to step 3.
function addEvents(batch) {
  const fresh = batch.filter((ev) => ev.id > state.lastEventId);
  if (!fresh.length) return;
  state.events.push(...fresh);
  state.events.sort((a, b) => a.id - b.id);
  state.lastEventId = state.events[state.events.length - 1].id;
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
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
      setConnection(`Job ${state.selectedId} does not exist (or no longer does).`);
      location.hash = "#/";
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

// Addresses: "#/" is the jobs list, "#/jobs/7" job 7 (older "#job-7" links still open it).
// Hash routes rather than paths: the server serves the dashboard as static files with no route
// per page, the relative API and asset URLs keep working behind a path prefix, and a bookmark or
// a shared link still opens the job.
function jobHref(id) {
  return `#/jobs/${id}`;
}

function jobIdFromHash() {
  const match = /^#(?:\/jobs\/|job-)(\d+)\/?$/.exec(location.hash);
  return match ? Number(match[1]) : null;
}

// ``moveFocus``: after the user navigated (not on the first load, where the Tab order must
// start at the top), put focus on the view's heading so the next Tab continues there.
function selectFromHash(moveFocus = false) {
  const id = jobIdFromHash();
  if (id === state.selectedId && state.viewShown) return;
  state.viewShown = true;
  const changed = id !== state.selectedId;
  state.selectedId = id;
  if (changed) {
    state.selected = null;
    state.selectedEtag = null;
    state.events = [];
    state.lastEventId = 0;
    document.getElementById("logs-text").textContent = "";
  }
  if (id == null) document.title = "NeuroLens";
  renderView();
  renderPanel();
  window.scrollTo(0, 0);
  if (moveFocus) document.getElementById(id == null ? "jobs-heading" : "job-heading").focus();
  // The poll reads the job and its events: one reader, so no page of events is read twice.
  schedule(0);
}

function toggleNewJob(open) {
  const button = document.getElementById("new-job-toggle");
  const panel = document.getElementById("new-job");
  panel.hidden = !open;
  button.setAttribute("aria-expanded", String(open));
  button.textContent = open ? "Close the form" : "New job";
  if (open) panel.querySelector("input, select").focus();
}

// ---------------------------------------------------------------------------------------------
// Actions and forms

async function runAction(action) {
  if (action === "delete") {
    const id = state.selectedId;
    return deleteThing(`job ${id}`, `api/jobs/${id}`, () => { location.hash = "#/"; poll(); });
  }
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
    toggleNewJob(false);
    // In the list at once, newest first: going back to it before the next poll shows the job.
    state.jobs = [result.data, ...state.jobs.filter((job) => job.id !== result.data.id)];
    state.jobsEtag = null;
    renderJobs();
    location.hash = jobHref(result.data.id);
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
  document.getElementById("new-job-toggle").addEventListener("click", () =>
    toggleNewJob(document.getElementById("new-job").hidden));
  window.addEventListener("hashchange", () => selectFromHash(true));
  window.addEventListener("resize", () => { if (state.selected) drawCharts(); });
  document.addEventListener("visibilitychange", () => schedule(document.hidden ? undefined : 0));
  loadPresets();
  selectFromHash(); // schedules the first poll at once
}

// What the other dashboard scripts (charts.js, verdict.js) share from this one.
window.NeuroLens = window.NeuroLens || {};
Object.assign(window.NeuroLens, { formatBytes, formatDuration, renderMetricList });

// A deferred script runs once the document is parsed; the listener covers being loaded without defer.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
