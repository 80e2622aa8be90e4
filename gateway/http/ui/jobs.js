// The "Jobs" tab: the latest jobs with live progress, one job's deliveries, the send form.

import {$, h, fill, facts, badge, placeDetail, revealDetail} from "./dom.js";
import {ago, ms, num, time, value} from "./format.js";
import {get, newest, post, ApiError} from "./api.js";

const getList = newest();

const PAGE = 20;
const SEGMENTS = [  // stacking order of the progress bar
  ["acknowledged", "acknowledged"], ["sent", "sent, not acked"], ["failed", "failed"],
  ["expired", "expired"], ["invalid_address", "invalid address"], ["suppressed", "suppressed (muted)"],
  ["queued", "queued"]];
const FINAL = new Set(["completed", "acknowledged", "rejected"]);

const view = {jobs: [], cursors: [null], next: null, filter: {q: "", state: ""}, open: null, deliveries: null};
let onOpen = () => {};
let loadedOnce = false;

/** The bar: one segment per delivery state, widths in % of targets. */
export function progress(job) {
  const c = job.counts;
  const total = Math.max(c.targets, 1);
  const done = c.targets - c.queued;
  const label = `${num(done)} of ${num(c.targets)} done: ` +
    SEGMENTS.filter(([k]) => c[k]).map(([k, name]) => `${num(c[k])} ${name}`).join(", ");
  const bar = h("div", {class: "bar", role: "img", "aria-label": label});
  for (const [k] of SEGMENTS) {
    if (!c[k]) continue;
    const seg = h("span", {class: `seg ${k}`});
    seg.style.width = `${(100 * c[k]) / total}%`;
    bar.append(seg);
  }
  return bar;
}

function countsText(job) {
  const c = job.counts;
  const parts = [`${num(c.targets - c.queued)}/${num(c.targets)} done`, `${num(c.acknowledged)} acked`];
  if (c.sent) parts.push(`${num(c.sent)} awaiting ack`);
  if (c.failed) parts.push(`${num(c.failed)} failed`);
  if (c.expired) parts.push(`${num(c.expired)} expired`);
  if (c.invalid_address) parts.push(`${num(c.invalid_address)} invalid address`);
  if (c.suppressed) parts.push(`${num(c.suppressed)} suppressed (muted by the person)`);
  return parts.join(" · ");
}

/** One job row (the Now tab's latest jobs use it too). */
export function jobRow(job) {
  const li = h("li", {class: "job", "data-job-id": job.job_id, "data-state": job.state,
                      "data-acked": job.counts.acknowledged, "data-done": job.counts.targets - job.counts.queued},
    h("div", {class: "jobhead"},
      h("button", {type: "button", class: "link", onclick: (ev) => openJob(job.job_id, {from: ev.currentTarget}),
                   "aria-label": `Show job ${job.job_id}`}, job.job_id),
      badge(job.state, `state-${job.state}`),
      job.title ? h("span", {class: "title"}, job.title) : null,
      h("span", {class: "muted small"}, `${job.source || ""} · `, ago(job.created_at))),
    progress(job),
    h("div", {class: "small counts"}, countsText(job)),
    job.error ? h("div", {class: "error small"}, `${job.error.code}: ${job.error.message}`) : null);
  return li;
}

// ------------------------------------------------------------------ list
export function loadJobs(cursorIndex = 0) {
  // Kept while it runs: a job opened meanwhile is placed under its row once the list is in.
  view.loading = fetchJobs(cursorIndex);
  return view.loading;
}

async function fetchJobs(cursorIndex) {
  const before = view.cursors[cursorIndex];
  const page = await getList("/ui/api/jobs", {limit: PAGE, before, q: view.filter.q, state: view.filter.state});
  if (!page) return;  // overtaken by a newer search, page or refresh
  view.jobs = page.jobs;
  view.cursors.length = cursorIndex + 1;
  view.index = cursorIndex;
  view.next = page.next;
  loadedOnce = true;
  renderList();
}

function renderList() {
  const list = $("#jobs-list");
  fill(list, view.jobs.length ? view.jobs.map(jobRow) : h("li", {class: "muted"}, "no jobs"));
  if (view.open) placeJobDetail();
  $("#jobs-newer").disabled = !view.index;
  $("#jobs-older").disabled = !view.next;
}

function onFirstPageUnfiltered() {
  return !view.index && !view.filter.q && !view.filter.state;
}

const newer = (a, b) => a.created_at > b.created_at || (a.created_at === b.created_at && a.job_id > b.job_id);

/** Put a job that is not shown yet where it belongs in a newest-first list of ``size``;
 * true if it went in. The row pushed out gives the list its "older" cursor. */
function place(list, job, size) {
  const at = list.findIndex((j) => newer(job, j));
  if (at < 0 && list.length >= size) return false;
  list.splice(at < 0 ? list.length : at, 0, job);
  return list.length > size ? (list.pop(), "trimmed") : true;
}

/** Jobs that changed (the event stream): rows shown are redrawn in place, new jobs that
 * belong on the first page are put there. No request: the event carries the data. */
export function jobsChanged(changed) {
  let redraw = false;
  let redrawLatest = false;
  for (const job of changed) {
    const i = view.jobs.findIndex((j) => j.job_id === job.job_id);
    if (i >= 0) {
      view.jobs[i] = job;
      const row = $(`#jobs-list li[data-job-id="${CSS.escape(job.job_id)}"]`);
      if (row) row.replaceWith(jobRow(job));
    } else if (onFirstPageUnfiltered()) {
      const placed = place(view.jobs, job, PAGE);
      if (placed === "trimmed") view.next = view.jobs[view.jobs.length - 1].cursor;
      redraw = redraw || Boolean(placed);
    }
    const k = latest.findIndex((j) => j.job_id === job.job_id);
    if (k >= 0) {
      latest[k] = job;
      const row = $(`#now-jobs li[data-job-id="${CSS.escape(job.job_id)}"]`);
      if (row) row.replaceWith(jobRow(job));
    } else {
      redrawLatest = place(latest, job, LATEST) || redrawLatest;
    }
    if (view.open && view.open.job_id === job.job_id) updateOpen(job);
  }
  if (redraw && loadedOnce) renderList();
  if (redrawLatest) renderLatest();
}

// The Now tab's latest jobs.
const LATEST = 5;
let latest = [];
export async function loadLatest() {
  latest = (await get("/ui/api/jobs", {limit: LATEST})).jobs;
  renderLatest();
}

function renderLatest() {
  fill($("#now-jobs"), latest.length ? latest.map(jobRow) : h("li", {class: "muted"}, "no jobs yet"));
}

// ------------------------------------------------------------------ one job
/** The row a job's detail belongs under: its row in the Jobs list, if shown. */
function jobListRow(jobId) {
  return $(`#jobs-list li.job[data-job-id="${CSS.escape(jobId)}"]`);
}

function placeJobDetail() {
  placeDetail($("#job-detail"), jobListRow(view.open.job_id), $("#job-detail-home"));
}

/** Open a job's detail under its row. ``from``: the control used on the Jobs tab (a row's
 * button, the send form): the detail opens under the row and the page moves only if it must.
 * Opened otherwise (the URL, a link, the Now tab) the detail is brought to the top. */
export async function openJob(jobId, {focus = true, from = null} = {}) {
  const detail = await get(`/ui/api/jobs/${encodeURIComponent(jobId)}`);
  view.open = detail;
  view.deliveries = {state: FINAL.has(detail.state) && (detail.counts.failed || detail.counts.invalid_address || detail.counts.expired) ? "problems" : "",
                     cursors: [""], index: 0};
  renderDetail();
  await loadDeliveries(0);
  onOpen("job", jobId);
  if (view.loading) await view.loading.catch(() => {});
  if (!view.open || view.open.job_id !== jobId) return;  // another job was opened meanwhile
  const section = $("#job-detail");
  placeJobDetail();
  section.hidden = false;
  const onThisTab = Boolean(from && from.closest("#panel-jobs"));
  revealDetail(section, jobListRow(jobId), !onThisTab);
  if (focus) $("#job-detail-title").focus({preventScroll: true});
}

/** "Ack latency" of the open job, from the same read as the deliveries shown under it. */
function latencyText(lat) {
  if (!lat || !lat.count) return "no acks yet";
  const le = lat.exact ? "" : "≤ ";
  return `${num(lat.count)} ${lat.count === 1 ? "ack" : "acks"} · mean ${ms(lat.mean_ms)} · p50 ${le}${ms(lat.p50_ms)}` +
         ` · p95 ${le}${ms(lat.p95_ms)} · max ${ms(lat.max_ms)}`;
}

function renderDetail() {
  const d = view.open;
  const n = d.notification || {};
  const lat = d.latency || {};
  const section = $("#job-detail");
  fill(section,
    h("div", {class: "detail-head"},
      h("h2", {id: "job-detail-title", tabindex: "-1"}, `Job ${d.job_id}`),
      h("button", {type: "button", onclick: closeJob, "aria-label": "Close job details"}, "Close")),
    h("div", {id: "job-live"},
      h("p", {}, badge(d.state, `state-${d.state}`), " ", h("span", {class: "small"}, countsText(d))),
      progress(d)),
    d.error ? h("p", {class: "error"}, `${d.error.code}: ${d.error.message}`) : null,
    facts([
      ["Title", n.title || "–"], ["Body", n.body || "–"],
      ["Target", d.target ? value(d.target) : "–"], ["Priority", n.priority || "–"],
      ["TTL", n.ttl === undefined || n.ttl === null ? "–" : `${n.ttl} s (expires ${time(d.expires_at)})`],
      ["Source", d.source], ["Created", time(d.created_at)],
      ["Ack latency", h("span", {id: "job-latency"}, latencyText(lat))],
    ]),
    h("h3", {}, "Deliveries"),
    h("div", {class: "toolbar"},
      h("div", {class: "field"},
        h("label", {for: "deliv-state"}, "Show"),
        h("select", {id: "deliv-state", onchange: (e) => { view.deliveries.state = e.target.value; loadDeliveries(0); }},
          [["", "all"], ["problems", "failed, expired, invalid address"], ["queued", "queued"], ["sent", "sent, not acked"],
           ["acknowledged", "acknowledged"], ["failed", "failed"], ["invalid_address", "invalid address"], ["expired", "expired"],
           ["suppressed", "suppressed (muted)"]]
            .map(([v, t]) => h("option", {value: v, selected: v === view.deliveries.state}, t))))),
    h("div", {class: "scroll"}, h("table", {class: "table", id: "deliv-table"},
      h("caption", {class: "sr-only"}, `Deliveries of job ${d.job_id}`),
      h("thead", {}, h("tr", {}, ["Device", "State", "Platform", "Attempts", "Outcome / reason", "Latency"]
        .map((t) => h("th", {scope: "col", class: t === "Attempts" || t === "Latency" ? "num" : ""}, t)))),
      h("tbody", {}))),
    h("div", {class: "pager"},
      h("button", {type: "button", id: "deliv-prev", onclick: () => loadDeliveries(view.deliveries.index - 1)}, "Previous"),
      h("button", {type: "button", id: "deliv-next", onclick: () => loadDeliveries(view.deliveries.index + 1)}, "Next")));
}

let refreshTimer = null;
function updateOpen(job) {
  const before = view.open.counts;
  Object.assign(view.open, job);
  fill($("#job-live"), h("p", {}, badge(job.state, `state-${job.state}`), " ", h("span", {class: "small"}, countsText(job))),
       progress(job));
  if (JSON.stringify(before) !== JSON.stringify(job.counts) && !refreshTimer) {
    // Deliveries change with the counts: refresh the page shown, at most every 2 s.
    refreshTimer = setTimeout(() => { refreshTimer = null; if (view.open) loadDeliveries(view.deliveries.index); }, 2000);
  }
}

async function loadDeliveries(index) {
  const dv = view.deliveries;
  if (index < 0) return;
  const after = dv.cursors[index];
  if (after === undefined) return;
  const jobId = view.open.job_id;
  const page = await get(`/ui/api/jobs/${encodeURIComponent(jobId)}/deliveries`,
                         {state: dv.state, after, limit: 50});
  if (!view.open || view.open.job_id !== jobId || view.deliveries !== dv) return;  // closed or replaced meanwhile
  dv.index = index;
  dv.cursors.length = index + 1;
  if (page.next) dv.cursors.push(page.next);
  // The latency and the rows come from one read: "no acks yet" is never drawn above an
  // acknowledged row, whether the acks came before the detail was opened or while it is.
  if (page.latency) fill($("#job-latency"), latencyText(page.latency));
  const body = $("#deliv-table tbody");
  fill(body, page.deliveries.length ? page.deliveries.map((r) => h("tr", {"data-device": r.device_id},
    h("td", {}, r.device_id), h("td", {}, badge(r.state, `d-${r.state}`)), h("td", {}, r.platform || "–"),
    h("td", {class: "num"}, num(r.attempts)), h("td", {}, [r.reason || (r.state === "acknowledged" ? `acked ${time(r.acked_at)}` : ""),
      r.moved && r.moved !== r.reason ? h("span", {class: "small"}, ` (${r.moved})`) : ""]),
    h("td", {class: "num"}, ms(r.latency_ms)))) : h("tr", {}, h("td", {colspan: 6, class: "muted"}, "none")));
  $("#deliv-prev").disabled = index === 0;
  $("#deliv-next").disabled = !page.next;
}

function closeJob() {
  view.open = null;
  const section = $("#job-detail");
  section.hidden = true;
  placeDetail(section, null, $("#job-detail-home"));
  onOpen("job", null);
}

// ------------------------------------------------------------------ the send form
const FIELD_OF = [  // API field (prefix) → the control it is shown next to
  ["target.devices", "devices"], ["target.segment", "segment"], ["target", "target"],
  ["notification.title", "title"], ["notification.body", "body"], ["notification.priority", "priority"],
  ["notification.ttl", "ttl"], ["notification.collapse_key", "collapse_key"], ["notification.data", "data"],
  ["notification", "title"], ["job_id", "job_id"]];

function controlFor(field) {
  for (const [prefix, name] of FIELD_OF) {
    if (field === prefix || field.startsWith(`${prefix}.`)) return name;
  }
  return null;
}

function clearErrors(form) {
  for (const p of form.querySelectorAll(".field-error")) { p.hidden = true; p.textContent = ""; }
  for (const c of form.querySelectorAll("[aria-invalid]")) c.removeAttribute("aria-invalid");
  $("#f-error").hidden = true;
  $("#f-ok").hidden = true;
}

function showFieldError(name, message) {
  const p = $(`#f-${name}-error`);
  const control = name === "target" ? $("#f-target") : $(`#f-${name}`);
  if (!p) return false;
  p.textContent = p.textContent ? `${p.textContent}; ${message}` : message;
  p.hidden = false;
  if (control) control.setAttribute("aria-invalid", "true");
  if (name === "ttl" || name === "job_id" || name === "collapse_key" || name === "data") $("#f-ttl").closest("details").open = true;
  return true;
}

function readForm(form) {
  const f = new FormData(form);
  const kind = f.get("target_kind");
  const job = {target: {}, notification: {}};
  const problems = [];
  if (kind === "devices") job.target.devices = String(f.get("devices") || "").split(/[\s,]+/).filter(Boolean);
  else if (kind === "segment") job.target.segment = String(f.get("segment") || "");
  else job.target.all = true;
  for (const k of ["title", "body", "collapse_key"]) {
    const v = String(f.get(k) || "");
    if (v) job.notification[k] = v;
  }
  job.notification.priority = f.get("priority");
  const ttl = String(f.get("ttl") || "").trim();
  if (ttl !== "") job.notification.ttl = /^-?\d+$/.test(ttl) ? Number(ttl) : ttl;  // the API judges it
  const data = {};
  String(f.get("data") || "").split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    const eq = line.indexOf("=");
    if (eq <= 0) problems.push(["data", `notification.data: line ${i + 1}: expected KEY=VALUE`]);
    else data[line.slice(0, eq).trim()] = line.slice(eq + 1);
  });
  if (Object.keys(data).length) job.notification.data = data;
  const jobId = String(f.get("job_id") || "").trim();
  if (jobId) job.job_id = jobId;
  return {job, problems};
}

async function submitJob(ev) {
  ev.preventDefault();
  const form = ev.target;
  clearErrors(form);
  const {job, problems} = readForm(form);
  if (problems.length) {
    problems.forEach(([name, msg]) => showFieldError(name, msg));
    return;
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const status = await post("/ui/api/jobs", job);
    const ok = $("#f-ok");
    ok.textContent = `Job ${status.job_id} ${status.state}.`;
    ok.hidden = false;
    jobsChanged([{...status, source: "http", title: job.notification.title || null}]);
    openJob(status.job_id, {focus: false, from: form});
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    let placed = false;
    let first = null;
    for (const {field, message} of err.fields) {
      const name = controlFor(field);
      if (name && showFieldError(name, message)) { placed = true; first = first || name; continue; }
      const e = $("#f-error");
      e.textContent = message;
      e.hidden = false;
    }
    if (!placed && !err.fields.length) {
      const e = $("#f-error");
      e.textContent = `${err.code}: ${err.message}`;
      e.hidden = false;
    }
    const focusOn = first === "target" ? $("#f-target input") : first ? $(`#f-${first}`) : null;
    if (focusOn) focusOn.focus();
  } finally {
    button.disabled = false;
  }
}

function onTargetKind() {
  const kind = new FormData($("#job-form")).get("target_kind");
  $("#f-devices-field").hidden = kind !== "devices";
  $("#f-segment-field").hidden = kind !== "segment";
}

// ------------------------------------------------------------------ set-up
export function initJobs(session, opened) {
  onOpen = opened;
  if (session.may.send_jobs) {
    $("#send").hidden = false;
    $("#job-form").addEventListener("submit", submitJob);
    for (const r of document.querySelectorAll("input[name=target_kind]")) r.addEventListener("change", onTargetKind);
  }
  $("#jobs-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    view.filter = {q: $("#jobs-q").value.trim(), state: $("#jobs-state").value};
    view.cursors = [null];
    loadJobs(0).catch(showListError);
  });
  $("#jobs-older").addEventListener("click", () => { view.cursors[view.index + 1] = view.next; loadJobs(view.index + 1).catch(showListError); });
  $("#jobs-newer").addEventListener("click", () => loadJobs(view.index - 1));
}

function showListError(err) {
  fill($("#jobs-list"), h("li", {class: "error", role: "alert"}, err.message));
}

export function openJobId() { return view.open ? view.open.job_id : null; }
