// The "Alarms" tab: alarms by state with value, since, escalation; Acknowledge (technician and up).

import {$, h, fill, badge} from "./dom.js";
import {time, value} from "./format.js";
import {newest, post, ApiError} from "./api.js";

const getList = newest();

const PAGE = 50;
const view = {state: "firing", cursors: [null], index: 0, rev: -1, stale: true};
let session = null;

function escalation(a) {
  const steps = ((session.rules || {})[a.rule] || {}).escalate || [];
  if (!steps.length) return "none configured";
  let text = `step ${a.escalation_step} of ${steps.length}`;
  if (a.state === "firing" && a.next_escalation_at) text += `, next ${time(a.next_escalation_at)}`;
  if (a.state === "acknowledged") text += ", stopped";
  return text;
}

export async function loadAlarms(index = 0) {
  const after = view.cursors[index];
  const page = await getList("/ui/api/alarms", {state: view.state, limit: PAGE,
                                                after_rule: after ? after[0] : null, after_key: after ? after[1] : null});
  if (!page) return;  // overtaken by a newer state filter, page or refresh
  view.index = index;
  view.cursors.length = index + 1;
  if (page.next) view.cursors.push(page.next);
  view.stale = false;
  for (const opt of $("#alarm-state").options) opt.textContent = `${opt.value} (${page.counts[opt.value] || 0})`;
  const may = session.may.ack_alarms;
  fill($("#alarm-table tbody"), page.alarms.length ? page.alarms.map((a) => h("tr", {"data-alarm": `${a.rule}/${a.key}`, "data-state": a.state},
    // data-label: a phone shows each row as a card, every value under its column's name.
    h("td", {"data-label": "Rule"}, a.rule), h("td", {"data-label": "Key"}, a.key),
    h("td", {"data-label": "State"}, badge(a.state, `alarm-${a.state}`)),
    h("td", {"data-label": "Value"}, value(a.value)),
    h("td", {"data-label": "Since"}, h("span", {title: a.since || ""}, time(a.since))),
    h("td", {class: "escalation", "data-label": "Escalation"}, escalation(a)),
    h("td", {"data-label": "Acknowledged by"}, a.acknowledged_by || "–"),
    h("td", {class: "small", "data-label": "Jobs"}, a.jobs.join(", ") || "–"),
    h("td", {class: "action"}, a.state === "firing" && may ? h("button", {type: "button", class: "primary",
      "aria-label": `Acknowledge alarm ${a.rule} ${a.key}`, onclick: (ev) => acknowledge(ev.target, a)}, "Acknowledge") : "")))
    : h("tr", {}, h("td", {colspan: 9, class: "muted"}, `no ${view.state} alarms`)));
  $("#alarm-prev").disabled = index === 0;
  $("#alarm-next").disabled = !page.next;
}

async function acknowledge(button, a) {
  button.disabled = true;
  const msg = $("#alarm-msg");
  try {
    const res = await post("/ui/api/alarms/ack", {rule: a.rule, key: a.key});
    const by = res.alarm && res.alarm.acknowledged_by;
    msg.textContent = `${a.rule} ${a.key} acknowledged by ${by}: escalation stopped.`;
    msg.className = "ok";
    await loadAlarms(view.index);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    msg.textContent = `${err.code}: ${err.message}`;
    msg.className = "error";
    button.disabled = false;
  }
}

/** The event stream's alarm revision: refetch the page shown when it moved. */
export function alarmsChanged(ev, visible) {
  if (ev.rev === view.rev) return;
  view.rev = ev.rev;
  view.stale = true;
  if (visible) loadAlarms(view.index).catch(() => {});
}

export function showAlarms() {
  if (view.stale) loadAlarms(view.index).catch(() => {});
}

export function initAlarms(s) {
  session = s;
  $("#alarm-state").addEventListener("change", (ev) => {
    view.state = ev.target.value;
    view.cursors = [null];
    loadAlarms(0).catch(() => {});
  });
  $("#alarm-next").addEventListener("click", () => loadAlarms(view.index + 1));
  $("#alarm-prev").addEventListener("click", () => loadAlarms(view.index - 1));
}
