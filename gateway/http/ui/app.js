// The operator page: session, tabs, and the one event stream that keeps everything live.

import {$, fill} from "./dom.js";
import {AGE_TICK_MS, tickAges} from "./format.js";
import {get, post, setCsrf} from "./api.js";
import {renderNow} from "./now.js";
import {initJobs, jobsChanged, loadJobs, loadLatest, openJob} from "./jobs.js";
import {initDevices, loadDevices, openDevice} from "./devices.js";
import {alarmsChanged, initAlarms, showAlarms} from "./alarms.js";
import {initPeople, showPeople} from "./people.js";

const TABS = ["now", "jobs", "devices", "alarms", "people"];
const loaded = new Set();
let current = "now";

function select(name, {focus = false} = {}) {
  current = name;
  for (const t of TABS) {
    const tab = $(`#tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`#panel-${t}`).hidden = !on;
  }
  if (focus) $(`#tab-${name}`).focus();
  if (!loaded.has(name)) {
    loaded.add(name);
    if (name === "jobs") loadJobs(0).catch(() => {});
    if (name === "devices") loadDevices(0).catch(() => {});
  }
  if (name === "alarms") showAlarms();
  if (name === "people") showPeople();
}

function route() {
  // #jobs, #job=<id>, #devices, #device=<id>, #alarms, #people (ids only: nothing secret in a URL)
  const hash = decodeURIComponent(window.location.hash.slice(1));
  const [what, id] = hash.split("=", 2);
  if (what === "job" && id) { select("jobs"); openJob(id, {focus: false}).catch(() => {}); return; }
  if (what === "device" && id) { select("devices"); openDevice(id).catch(() => {}); return; }
  select(TABS.includes(what) ? what : "now");
}

function opened(kind, id) {
  if (kind === "job" && current !== "jobs") select("jobs");
  const hash = id ? `#${kind}=${encodeURIComponent(id)}` : `#${current}`;
  if (window.location.hash !== hash) history.replaceState(null, "", hash);
}

function setLive(text, ok) {
  const live = $("#live");
  fill(live, text);
  live.className = `live ${ok ? "on" : "off"}`;
}

function connect() {
  const es = new EventSource("/ui/api/events");
  es.addEventListener("open", () => setLive("live", true));
  es.addEventListener("now", (e) => renderNow(JSON.parse(e.data)));
  es.addEventListener("jobs", (e) => jobsChanged(JSON.parse(e.data)));
  es.addEventListener("alarms", (e) => alarmsChanged(JSON.parse(e.data), current === "alarms"));
  es.addEventListener("resync", () => {
    loadLatest().catch(() => {});
    if (loaded.has("jobs")) loadJobs(0).catch(() => {});
    alarmsChanged({rev: NaN}, current === "alarms");
  });
  es.addEventListener("logout", () => window.location.assign("/"));
  es.addEventListener("error", () => {
    setLive("reconnecting…", false);
    if (es.readyState === EventSource.CLOSED) {
      // Refused (session over, or the gateway restarted): go through the login again.
      get("/ui/api/session").then(() => setTimeout(connect, 3000), () => {});
    }
  });
}

async function main() {
  const session = await get("/ui/api/session");
  setCsrf(session.csrf);
  fill($("#who"), `${session.user} (${session.role})`);
  document.body.dataset.role = session.role;
  $("#logout").addEventListener("click", async () => {
    try { await post("/ui/logout"); } finally { window.location.assign("/"); }
  });
  const tablist = $(".tabs");
  for (const t of TABS) $(`#tab-${t}`).addEventListener("click", () => { select(t); opened(t, null); });
  tablist.addEventListener("keydown", (ev) => {  // arrow keys move between tabs (WAI-ARIA tabs)
    const i = TABS.indexOf(current);
    let next = null;
    if (ev.key === "ArrowRight") next = TABS[(i + 1) % TABS.length];
    else if (ev.key === "ArrowLeft") next = TABS[(i + TABS.length - 1) % TABS.length];
    else if (ev.key === "Home") next = TABS[0];
    else if (ev.key === "End") next = TABS[TABS.length - 1];
    if (next) { ev.preventDefault(); select(next, {focus: true}); opened(next, null); }
  });
  initJobs(session, opened);
  initDevices(opened);
  initAlarms(session);
  initPeople();
  window.addEventListener("hashchange", route);
  route();
  await loadLatest();
  connect();
  setInterval(tickAges, AGE_TICK_MS);  // "… ago" keeps counting between events
  document.body.dataset.ready = "true";
}

main().catch((err) => {
  document.body.dataset.ready = "error";
  fill($("#health"), `cannot load: ${err.message}`);
});
