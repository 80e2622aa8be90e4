// A person's own page (/me): their inbox, their devices (and this browser's Web Push
// subscription), their preferences. Everything goes through the /v1/me routes, which
// answer for the logged-in person only.

import {$, h, fill, badge} from "./dom.js";
import {ApiError, get, newest, post, put, del, setCsrf} from "./api.js";
import {time} from "./format.js";

const PAGE = 20;
const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const THIS_BROWSER = "homepot-me-browser";  // localStorage: the device id this browser is registered as
const inbox = {cursors: [null], index: 0};
const getInbox = newest();
let person = null;

function showError(err) {
  const el = $("#me-error");
  el.hidden = !err;
  fill(el, err ? String(err.message || err) : "");
}

// ------------------------------------------------------------------ the person
async function loadMe() {
  const resp = await fetch("/v1/me", {headers: {Accept: "application/json"}, credentials: "same-origin"});
  if (resp.status === 401) { window.location.assign("/me"); throw new Error("logged out"); }
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, body);
  const csrf = resp.headers.get("X-CSRF-Token");
  if (csrf) setCsrf(csrf);
  person = body;
  fill($("#who"), person.name ? `${person.name} (${person.person_id})` : person.person_id);
  return person;
}

// ------------------------------------------------------------------ inbox
function stateText(n) {
  if (n.state === "queued") return "waiting";
  if (n.state === "sent") return "delivered";
  if (n.state === "acknowledged") return "seen";
  return n.state.replace("_", " ");
}

// Why a notification still waits, in the person's words (the gateway's are the operator's).
function reasonText(n) {
  if (!n.reason) return null;
  const text = n.reason.replace("waiting for the person's earlier device", "your earlier device first");
  return h("div", {class: "reason-text small muted"}, text.replace(/\d{4}-\d\d-\d\dT[\d:.]+Z/g, (iso) => time(iso)));
}

function item(n) {
  return h("li", {class: n.opened ? "opened" : "unopened", "data-message": n.message_id, "data-job": n.job_id},
    h("div", {class: "title"}, n.title || "(no title)"),
    n.body ? h("div", {class: "body"}, n.body) : null,
    h("div", {class: "meta"},
      badge(n.priority, `p-${n.priority}`),
      badge(stateText(n), `d-${n.state}`),
      n.opened ? badge("opened", "ok") : null,
      h("span", {title: n.created_at}, time(n.created_at)),
      h("span", {}, `on ${n.device_id}`)),
    reasonText(n),
    n.opened ? null : h("button", {type: "button", class: "open", onclick: () => openItem(n),
                                   "aria-label": `Open ${n.title || n.message_id}`}, "Open"));
}

async function loadInbox(index = inbox.index) {
  const items = await getInbox("/v1/me/inbox", {limit: PAGE, before: inbox.cursors[index]});
  if (!items) return;  // overtaken by a newer page or refresh
  inbox.index = index;
  inbox.cursors.length = index + 1;
  if (items.length === PAGE) inbox.cursors.push(items[items.length - 1].message_id);
  fill($("#inbox"), items.map(item));
  fill($("#inbox-msg"), items.length ? "" : (index ? "nothing older" : "no notifications yet"));
  $("#inbox-newer").disabled = index === 0;
  $("#inbox-older").disabled = inbox.cursors.length <= index + 1;
  document.body.dataset.inbox = String(Date.now());
  return items;
}

async function openItem(n) {
  try {
    await post(`/v1/me/inbox/${encodeURIComponent(n.message_id)}/open`);
    showError(null);
  } catch (err) {
    showError(err);
  }
  await loadInbox();
}

// ------------------------------------------------------------------ devices
function platforms(d) {
  if (d.missing) return h("span", {class: "muted"}, "not registered");
  return h("span", {class: "muted"}, (d.channels || []).map((c) => c.platform).join(" → "));
}

async function loadDevices() {
  const devices = await get("/v1/me/devices");
  const mine = localStorage.getItem(THIS_BROWSER);
  fill($("#devices"), devices.length ? devices.map((d) => h("li", {"data-device": d.device_id},
    h("span", {class: "name"}, d.device_id), platforms(d),
    d.device_id === mine ? badge("this browser", "ok") : null,
    h("button", {type: "button", class: "remove", "aria-label": `Remove ${d.device_id}`,
                 onclick: () => removeDevice(d.device_id)}, "Remove")))
    : h("li", {class: "muted"}, "no devices yet"));
  const input = $("#s-device_id");
  if (!input.value) input.value = mine || `${person.person_id}-browser-${Math.random().toString(16).slice(2, 6)}`;
  return devices;
}

async function removeDevice(deviceId) {
  try {
    await del(`/v1/me/devices/${encodeURIComponent(deviceId)}`);
    if (localStorage.getItem(THIS_BROWSER) === deviceId) localStorage.removeItem(THIS_BROWSER);
    showError(null);
  } catch (err) {
    showError(err);
  }
  await loadDevices();
}

/** Register a Web Push subscription (PushSubscription.toJSON()) as one of my devices. */
async function registerBrowser(deviceId, subscription) {
  const device = await put(`/v1/me/devices/${encodeURIComponent(deviceId)}`,
                           {device_id: deviceId, channels: [{platform: "webpush", subscription}]});
  localStorage.setItem(THIS_BROWSER, deviceId);
  await loadDevices();
  return device;
}

function fieldMessage(form, prefix, err) {
  // The server's words, each next to its field; what names no field goes to the form's line.
  let placed = false;
  for (const {field, message} of err.fields || []) {
    const el = form.querySelector(`#${prefix}-${fieldId(field)}-error`);
    if (el) {
      el.hidden = false;
      fill(el, message);
      const input = form.querySelector(`#${prefix}-${fieldId(field)}`);
      if (input) input.setAttribute("aria-invalid", "true");
      placed = true;
    }
  }
  return placed;
}

function fieldId(field) {
  const parts = String(field).split(".");
  if (parts[0] === "muted") return parts[1] === "rules" ? "muted_rules" : "muted_segments";
  return parts[0];
}

function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) { el.hidden = true; fill(el, ""); }
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

async function subscribeSubmit(ev) {
  ev.preventDefault();
  const form = $("#subscribe");
  clearErrors(form);
  const deviceId = $("#s-device_id").value.trim();
  const msg = $("#s-msg");
  fill(msg, "subscribing…");
  msg.className = "";
  try {
    if (!window.homepot) throw new Error("the Web Push client did not load");
    const sub = await window.homepot.subscribe();  // permission, /web/sw.js, pushManager.subscribe
    await registerBrowser(deviceId, sub);
    fill(msg, `this browser gets your notifications as ${deviceId}`);
    msg.className = "ok";
  } catch (err) {
    if (err instanceof ApiError && fieldMessage(form, "s", err)) fill(msg, "");
    else { fill(msg, String(err.message || err)); msg.className = "error"; }
  }
}

// ------------------------------------------------------------------ preferences
function daysText(days) {
  // ["mon","tue","wed"] → "mon-wed"; every day → "daily"
  const idx = [...new Set(days)].map((d) => DAYS.indexOf(d)).filter((i) => i >= 0).sort((a, b) => a - b);
  if (idx.length === 7) return "daily";
  const runs = [];
  for (const i of idx) {
    const last = runs[runs.length - 1];
    if (last && i === last[1] + 1) last[1] = i; else runs.push([i, i]);
  }
  return runs.map(([a, b]) => (a === b ? DAYS[a] : b === a + 1 ? `${DAYS[a]},${DAYS[b]}` : `${DAYS[a]}-${DAYS[b]}`)).join(",");
}

function quietText(windows) {
  return (windows || []).map((w) => `${daysText(w.days || DAYS)} ${w.from}-${w.to}`).join("\n");
}

/** "mon-fri 22:00-06:00" lines → [{days, from, to}]; throws naming the line. */
export function parseQuiet(text) {
  const out = [];
  text.split("\n").map((l) => l.trim()).forEach((line, n) => {
    if (!line) return;
    const bad = (why) => new Error(`quiet_hours: line ${n + 1} (${line}): ${why}`);
    const tokens = line.split(/\s+/);
    if (tokens.length > 2) throw bad("expected DAYS FROM-TO, e.g. mon-fri 22:00-06:00");
    const range = tokens[tokens.length - 1];
    const m = /^(\d{1,2}:\d{2})-(\d{1,2}:\d{2})$/.exec(range);
    if (!m) throw bad("expected FROM-TO as HH:MM-HH:MM");
    const pad = (t) => (t.length === 4 ? `0${t}` : t);
    let days = DAYS.slice();
    if (tokens.length === 2 && tokens[0].toLowerCase() !== "daily") {
      days = [];
      for (const part of tokens[0].toLowerCase().split(",")) {
        const [a, b] = part.split("-");
        const i = DAYS.indexOf(a);
        const j = b === undefined ? i : DAYS.indexOf(b);
        if (i < 0 || j < 0) throw bad(`${part}: days are ${DAYS.join(", ")} or daily`);
        for (let k = i; ; k = (k + 1) % 7) { days.push(DAYS[k]); if (k === j) break; }
      }
    }
    out.push({days: [...new Set(days)], from: pad(m[1]), to: pad(m[2])});
  });
  return out;
}

const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

function fillPrefs(p) {
  $("#p-timezone").value = p.timezone || "";
  $("#p-quiet_hours").value = quietText(p.quiet_hours);
  $("#p-bypass_priority").value = p.bypass_priority || "high";
  $("#p-muted_segments").value = ((p.muted || {}).segments || []).join(", ");
  $("#p-muted_rules").value = ((p.muted || {}).rules || []).join(", ");
  $("#p-reach_after_s").value = p.reach_after_s ?? "";
  $("#p-reach_after_s").placeholder = p.reach_after_s === null ? "the site's default" : "";
  $("#p-quiet_hours").placeholder = p.quiet_hours === null ? "the site's default" : "none";
}

async function savePrefs(ev) {
  ev.preventDefault();
  const form = $("#prefs");
  clearErrors(form);
  const error = $("#p-error");
  const ok = $("#p-ok");
  error.hidden = ok.hidden = true;
  let quiet;
  try {
    // Left empty by someone who follows the site's default: still the default (null).
    const text = $("#p-quiet_hours").value;
    quiet = text.trim() === "" && person.quiet_hours === null ? null : parseQuiet(text);
  } catch (err) {
    fieldMessage(form, "p", {fields: [{field: "quiet_hours", message: err.message}]});
    return;
  }
  const reach = $("#p-reach_after_s").value.trim();
  const prefs = {
    timezone: $("#p-timezone").value.trim(),
    quiet_hours: quiet,
    bypass_priority: $("#p-bypass_priority").value,
    muted: {segments: list($("#p-muted_segments").value), rules: list($("#p-muted_rules").value)},
    // Empty: the site's default; anything but digits goes as typed, for the server to name.
    reach_after_s: reach === "" ? null : /^\d+$/.test(reach) ? Number(reach) : reach,
  };
  try {
    person = await put("/v1/me/preferences", prefs);
    fillPrefs(person);
    ok.hidden = false;
    fill(ok, "saved");
  } catch (err) {
    if (!(err instanceof ApiError) || !fieldMessage(form, "p", err)) {
      error.hidden = false;
      fill(error, String(err.message || err));
    }
  }
}

function timezones() {
  try {
    const zones = Intl.supportedValuesOf("timeZone");
    fill($("#timezones"), zones.map((z) => h("option", {value: z})));
  } catch { /* an older browser: free text */ }
}

// ------------------------------------------------------------------ start
async function main() {
  await loadMe();
  $("#logout").addEventListener("click", async () => {
    try { await post("/ui/logout"); } finally { window.location.assign("/me"); }
  });
  $("#inbox-refresh").addEventListener("click", () => loadInbox().catch(showError));
  $("#inbox-newer").addEventListener("click", () => loadInbox(inbox.index - 1).catch(showError));
  $("#inbox-older").addEventListener("click", () => loadInbox(inbox.index + 1).catch(showError));
  $("#subscribe").addEventListener("submit", subscribeSubmit);
  $("#prefs").addEventListener("submit", savePrefs);
  // New notifications show when the page comes back into view, and every 30 s while it is.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") loadInbox().catch(() => {});
  });
  setInterval(() => { if (document.visibilityState === "visible") loadInbox().catch(() => {}); }, 30_000);
  timezones();
  fillPrefs(person);
  await Promise.all([loadInbox(0), loadDevices()]);
  window.homepotMe = {registerBrowser, loadInbox, loadDevices, parseQuiet};
  document.body.dataset.ready = "true";
}

main().catch((err) => {
  document.body.dataset.ready = "error";
  showError(err);
});
