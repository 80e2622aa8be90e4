// The "People" tab: persons with their devices in reach order, time zone, quiet hours,
// bypass priority and mutes, a page at a time (server-side, by person_id).

import {$, h, fill, badge} from "./dom.js";
import {newest} from "./api.js";
import {num} from "./format.js";

const PAGE = 50;
const view = {q: "", cursors: [""], index: 0, loaded: false};
const getList = newest();

function reachList(p) {
  if (!p.devices.length) return h("span", {class: "muted"}, "none");
  return h("ol", {class: "channels"}, p.devices.map((d) => h("li", {},
    h("span", {class: "platform"}, d.device_id),
    d.missing ? [" ", badge("not registered", "bad")] : ` ${d.platforms.join(" → ")}`)));
}

function quiet(p) {
  if (!p.quiet_hours.length) return "none";
  return h("span", {}, p.quiet_hours.map((w, i) => [i ? h("br") : null, w]),
    p.quiet_default ? h("span", {class: "muted small"}, " (site default)") : null);
}

function muted(p) {
  const parts = [];
  if (p.muted.segments.length) parts.push(`segments: ${p.muted.segments.join(", ")}`);
  if (p.muted.rules.length) parts.push(`rules: ${p.muted.rules.join(", ")}`);
  return parts.length ? parts.join("; ") : "nothing";
}

// data-label: a phone shows each row as a card, every value under its column's name; the
// value is one block so that its lines stack beside the label.
const cell = (label, ...children) => h("td", {"data-label": label}, h("div", {class: "cell"}, ...children));

export async function loadPeople(index = 0) {
  const page = await getList("/ui/api/people", {q: view.q, after: view.cursors[index], limit: PAGE});
  if (!page) return;  // overtaken by a newer search or page
  view.index = index;
  view.cursors.length = index + 1;
  if (page.next) view.cursors.push(page.next);
  view.loaded = true;
  fill($("#people-total"), `${num(page.total)} ${page.total === 1 ? "person" : "people"}`);
  fill($("#people-table tbody"), page.people.length ? page.people.map((p) => h("tr", {"data-person": p.person_id},
    cell("Person", h("strong", {}, p.person_id), p.name ? h("div", {class: "small"}, p.name) : null),
    cell("Account", p.account || "–"),
    cell("Devices, in reach order", reachList(p), h("div", {class: "small muted"}, `next device after ${p.reach_after_s} s`)),
    cell("Time zone", p.timezone),
    cell("Quiet hours", quiet(p), h("div", {class: "small muted"}, `through them from ${p.bypass_priority}`)),
    cell("Muted", muted(p))))
    : h("tr", {}, h("td", {colspan: 6, class: "muted"}, view.q ? "no person matches" : "no people yet (homepot-gateway people add)")));
  $("#people-prev").disabled = index === 0;
  $("#people-next").disabled = !page.next;
}

export function showPeople() {
  if (!view.loaded) loadPeople(0).catch(() => {});
}

export function initPeople() {
  $("#people-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    view.q = $("#people-q").value.trim();
    view.cursors = [""];
    loadPeople(0).catch(() => {});
  });
  $("#people-next").addEventListener("click", () => loadPeople(view.index + 1));
  $("#people-prev").addEventListener("click", () => loadPeople(view.index - 1));
}
