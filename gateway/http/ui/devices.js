// The "Devices" tab: search by id prefix, segment and tag, a page at a time (server-side).

import {$, h, fill, facts, badge} from "./dom.js";
import {ago, ms, num, time} from "./format.js";
import {get} from "./api.js";

const PAGE = 50;
const view = {filter: {q: "", segment: "", tag: ""}, cursors: [""], index: 0, total: 0};
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
  if (p && p.connected) return h("span", {title: `since ${p.since}`}, badge("connected", "ok"), ` since ${ago(p.since)}`);
  if (p && p.last_seen) return h("span", {title: p.last_seen}, badge("not connected", "bad"), ` last seen ${ago(p.last_seen)}`);
  return h("span", {}, badge("not connected", "bad"), " not seen since start");
}

export async function loadDevices(index = 0) {
  const after = view.cursors[index];
  const page = await get("/ui/api/devices", {...view.filter, after, limit: PAGE});
  view.index = index;
  view.cursors.length = index + 1;
  if (page.next) view.cursors.push(page.next);
  view.total = page.total;
  const body = $("#dev-table tbody");
  fill(body, page.devices.length ? page.devices.map((d) => h("tr", {"data-device": d.device_id},
    h("td", {}, h("button", {type: "button", class: "link", onclick: () => openDevice(d.device_id),
                             "aria-label": `Show device ${d.device_id}`}, d.device_id)),
    h("td", {}, d.segment || "–"),
    h("td", {}, d.tags.length ? d.tags.map((t) => h("span", {class: "tag"}, t)) : "–"),
    h("td", {}, channels(d.channels)),
    h("td", {class: "online"}, online(d)),
    h("td", {}, d.last_ack_at ? h("span", {title: d.last_ack_at}, ago(d.last_ack_at)) : "never")))
    : h("tr", {}, h("td", {colspan: 6, class: "muted"}, "no device matches")));
  const first = index * PAGE + (page.devices.length ? 1 : 0);
  fill($("#dev-total"), `${num(page.total)} ${page.total === 1 ? "device matches" : "devices match"}`);
  fill($("#dev-page"), page.devices.length ? `${num(first)}–${num(index * PAGE + page.devices.length)} of ${num(page.total)}` : "");
  $("#dev-prev").disabled = index === 0;
  $("#dev-next").disabled = !page.next;
}

export async function openDevice(deviceId) {
  const d = await get(`/ui/api/devices/${encodeURIComponent(deviceId)}`);
  const section = $("#device-detail");
  fill(section,
    h("div", {class: "detail-head"},
      h("h2", {id: "device-detail-title", tabindex: "-1"}, `Device ${d.device_id}`),
      h("button", {type: "button", "aria-label": "Close device details",
                   onclick: () => { section.hidden = true; onOpen("device", null); }}, "Close")),
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
  section.hidden = false;
  onOpen("device", deviceId);
  $("#device-detail-title").focus();
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
