// The "Devices" tab: search by id prefix, segment and tag, a page at a time (server-side).

import {$, h, fill, facts, badge, placeDetail, revealDetail} from "./dom.js";
import {ago, ms, num, time} from "./format.js";
import {get, newest} from "./api.js";

const getList = newest();

const PAGE = 50;
const view = {filter: {q: "", segment: "", tag: ""}, cursors: [""], index: 0, total: 0, open: null, loading: null};
let onOpen = () => {};

function channels(list) {
  return h("ol", {class: "channels"}, list.map((c) => h("li", {class: c.invalid ? "invalid" : ""},
    h("span", {class: "platform"}, c.platform), c.address ? ` ${c.address}` : "",
    c.invalid ? [" ", badge("invalid", "bad"), h("span", {class: "small"}, ` since ${time(c.invalid.at)}: ${c.invalid.reason}`)] : "")));
}

// Whether an MQTT device's agent is connected to the gateway's broker (its device account).
function online(d) {
  const p = d.presence;
  if (!d.channels.some((c) => c.platform === "mqtt")) return "–";
  if (p && p.connected) return h("span", {}, badge("connected", "ok"), " since ", ago(p.since));
  if (p && p.last_seen) return h("span", {}, badge("not connected", "bad"), " last seen ", ago(p.last_seen));
  return h("span", {}, badge("not connected", "bad"), " not seen since start");
}

export function loadDevices(index = 0) {
  // Kept while it runs: a device opened meanwhile is placed under its row once the page is in.
  view.loading = fetchDevices(index);
  return view.loading;
}

async function fetchDevices(index) {
  const after = view.cursors[index];
  const page = await getList("/ui/api/devices", {...view.filter, after, limit: PAGE});
  if (!page) return;  // overtaken by a newer search or page
  view.index = index;
  view.cursors.length = index + 1;
  if (page.next) view.cursors.push(page.next);
  view.total = page.total;
  const body = $("#dev-table tbody");
  // data-label: a phone shows each row as a card, every value under its column's name.
  fill(body, page.devices.length ? page.devices.map((d) => h("tr", {"data-device": d.device_id},
    h("td", {"data-label": "Device"}, h("button", {type: "button", class: "link", onclick: (ev) => openDevice(d.device_id, {from: ev.currentTarget}),
                                                   "aria-label": `Show device ${d.device_id}`}, d.device_id)),
    h("td", {"data-label": "Segment"}, d.segment || "–"),
    h("td", {"data-label": "Tags"}, d.tags.length ? d.tags.map((t) => h("span", {class: "tag"}, t)) : "–"),
    h("td", {"data-label": "Channels"}, channels(d.channels)),
    h("td", {class: "online", "data-label": "Connected"}, online(d)),
    h("td", {"data-label": "Last ack"}, d.last_ack_at ? ago(d.last_ack_at) : "never")))
    : h("tr", {}, h("td", {colspan: 6, class: "muted"}, "no device matches")));
  if (view.open) placeDeviceDetail();
  const first = index * PAGE + (page.devices.length ? 1 : 0);
  fill($("#dev-total"), `${num(page.total)} ${page.total === 1 ? "device matches" : "devices match"}`);
  fill($("#dev-page"), page.devices.length ? `${num(first)}–${num(index * PAGE + page.devices.length)} of ${num(page.total)}` : "");
  $("#dev-prev").disabled = index === 0;
  $("#dev-next").disabled = !page.next;
}

function deviceRow(deviceId) {
  return $(`#dev-table tr[data-device="${CSS.escape(deviceId)}"]`);
}

function placeDeviceDetail() {
  placeDetail($("#device-detail"), deviceRow(view.open), $("#device-detail-home"));
}

function closeDevice() {
  view.open = null;
  const section = $("#device-detail");
  section.hidden = true;
  placeDetail(section, null, $("#device-detail-home"));
  onOpen("device", null);
}

/** Open a device's detail under its row (``from``: the button clicked there; the page moves
 * only if it must). Opened by the URL or a link it is brought to the top of the screen. */
export async function openDevice(deviceId, {from = null} = {}) {
  const d = await get(`/ui/api/devices/${encodeURIComponent(deviceId)}`);
  view.open = deviceId;
  if (view.loading) await view.loading.catch(() => {});
  if (view.open !== deviceId) return;  // another device was opened meanwhile
  const section = $("#device-detail");
  fill(section,
    h("div", {class: "detail-head"},
      h("h2", {id: "device-detail-title", tabindex: "-1"}, `Device ${d.device_id}`),
      h("button", {type: "button", "aria-label": "Close device details", onclick: closeDevice}, "Close")),
    facts([
      ["Segment", d.segment || "–"], ["Tags", d.tags.join(", ") || "–"],
      ["Channels, in order", channels(d.channels)],
      ["Connected", online(d)],
      ["Last ack", d.last_ack ? `${d.last_ack.status} at ${time(d.last_ack.at)} (job ${d.last_ack.job_id}${d.last_ack.via ? `, by ${d.last_ack.via}` : ""})` : "never"],
      ["Registered / changed", time(d.updated_at)],
    ]),
    h("h3", {}, "Recent deliveries"),
    h("div", {class: "scroll"}, h("table", {class: "table"},
      h("caption", {class: "sr-only"}, `Recent deliveries to ${d.device_id}`),
      h("thead", {}, h("tr", {}, ["Job", "State", "Platform", "Attempts", "Outcome / reason", "Latency"].map((t) => h("th", {scope: "col", class: t === "Attempts" || t === "Latency" ? "num" : ""}, t)))),
      h("tbody", {}, d.recent.length ? d.recent.map((r) => h("tr", {},
        h("td", {}, h("a", {href: `#job=${encodeURIComponent(r.job_id)}`}, r.job_id)), h("td", {}, badge(r.state, `d-${r.state}`)), h("td", {}, r.platform || "–"),
        h("td", {class: "num"}, num(r.attempts)), h("td", {}, r.reason || ""), h("td", {class: "num"}, ms(r.latency_ms))))
        : h("tr", {}, h("td", {colspan: 6, class: "muted"}, "none"))))));
  placeDeviceDetail();
  section.hidden = false;
  onOpen("device", deviceId);
  revealDetail(section, deviceRow(deviceId), !(from && from.closest("#panel-devices")));
  $("#device-detail-title").focus({preventScroll: true});
}

export function initDevices(opened) {
  onOpen = opened;
  $("#dev-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    view.filter = {q: $("#dev-q").value.trim(), segment: $("#dev-segment").value.trim(), tag: $("#dev-tag").value.trim()};
    view.cursors = [""];
    loadDevices(0).catch((err) => fill($("#dev-total"), h("span", {class: "error", role: "alert"}, err.message)));
  });
  $("#dev-next").addEventListener("click", () => loadDevices(view.index + 1));
  $("#dev-prev").addEventListener("click", () => loadDevices(view.index - 1));
}
