// The "Now" tab: gateway state, bridges, broker, queue, cloud link, alarms, ack latency.

import {$, h, fill, facts, badge} from "./dom.js";
import {age, bytes, ms, num, time, value} from "./format.js";

export function renderNow(now) {
  const g = now.gateway;
  const failing = Object.entries(g.checks || {}).filter(([, c]) => !c.ok);
  const status = g.status === "ok" ? "healthy" : (g.status || "unknown");
  const why = failing.map(([k, c]) => `${k}: ${c.detail}`).join("; ");
  const health = $("#health");
  fill(health, badge(status, g.status === "ok" ? "ok" : "bad"), why ? ` ${why}` : "");
  // The header shows two lines of it (whole in the tooltip and on the Gateway card).
  if (why) health.title = why; else health.removeAttribute("title");
  fill($("#site"), g.site_id);
  fill($("#now-gateway"), facts([
    ["State", [badge(status, g.status === "ok" ? "ok" : "bad"), ` ${g.state || ""}`]],
    why ? ["Failing", why] : null,
    ["Mode", `${g.mode} broker`],
    ["Uptime", h("span", {title: `since ${g.started_at}`}, age(g.uptime_s))],
    ["Version", g.version || "–"],
    ["Broker client", g.broker_client_connected ? "connected" : badge("not connected", "bad")],
    ["Devices", num(now.devices)],
    ["Jobs in progress", num(now.jobs_active)],
  ]));

  const q = now.queue;
  fill($("#now-queue"), facts([
    ["Queued deliveries", h("strong", {"data-testid": "queue-depth"}, num(q.depth))],
    ["Oldest queued", q.oldest_age_s === null ? "none queued" : age(q.oldest_age_s)],
    ...Object.entries(q.by_platform).map(([p, n]) => [`Queued on ${p}`, num(n)]),
    ["Sent, awaiting ack", num(now.deliveries.sent)],
    ["Failed / expired / invalid", `${num(now.deliveries.failed)} / ${num(now.deliveries.expired)} / ${num(now.deliveries.invalid_address)}`],
    ["Suppressed (muted by the person)", num(now.deliveries.suppressed || 0)],
  ]));

  const bridges = Object.entries(now.bridges);
  fill($("#now-bridges"), bridges.length ? h("div", {class: "scroll"}, h("table", {class: "table compact"},
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "Platform"), h("th", {scope: "col"}, "Health"),
                    h("th", {scope: "col", class: "num"}, "In flight"), h("th", {scope: "col", class: "num", title: `counted since the gateway started (${g.started_at})`},
                      `Sent since ${time(g.started_at)}`))),
    // One tbody per bridge: an unhealthy one's reason gets a row of its own, full width.
    bridges.sort().map(([name, b]) => h("tbody", {"data-bridge": name},
      h("tr", {},
        h("td", {}, name),
        h("td", {}, b.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad")),
        h("td", {class: "num"}, num(b.in_flight)), h("td", {class: "num"}, num(b.sent))),
      b.healthy ? null : h("tr", {class: "reason-row"}, h("td", {colspan: 4, class: "reason"}, b.reason || "no reason given"))))))
    : h("p", {class: "muted"}, "no bridge enabled"));

  const b = now.broker;
  fill($("#now-broker"), b ? facts([
    ["Clients connected", num(b.clients_connected)],
    ["Sessions", num(b.sessions)],
    ["Subscriptions", num(b.subscriptions)],
    ["Retained messages", num(b.retained)],
    ["Queued for clients", num(b.queued)],
    ["Dropped (queue cap)", num(b.dropped)],
  ]) : h("p", {class: "muted"}, "external broker: its own tools show its clients"));

  const u = now.upstream;
  fill($("#now-upstream"), u ? facts([
    ["Link", u.connected ? badge("connected", "ok") : [badge("not connected", "bad"), u.last_error ? ` ${u.last_error}` : ""]],
    ["Backlog", `${num(u.buffer_rows)} messages, ${bytes(u.buffer_bytes)}`],
    ["Oldest waiting", u.buffer_oldest_age_s === null || u.buffer_oldest_age_s === undefined ? "–" : age(u.buffer_oldest_age_s)],
    ["Drain rate", u.drain_rate === null || u.drain_rate === undefined ? "–" : `${u.drain_rate.toFixed(1)}/s`],
    ["Dropped", num(u.buffer_dropped)],
  ]) : h("p", {class: "muted"}, "no cloud link configured ([upstream])"));

  const a = now.alarms;
  fill($("#now-alarms"),
    h("p", {}, h("strong", {class: a.counts.firing ? "alert" : ""}, `${num(a.counts.firing)} firing`),
      ` · ${num(a.counts.acknowledged)} acknowledged · ${num(a.counts.pending)} pending`),
    a.firing.length ? h("ul", {class: "plain"}, a.firing.map((x) => h("li", {},
      h("strong", {}, `${x.rule} ${x.key}`), ` = ${value(x.value)} since ${time(x.fired_at)}`,
      x.escalation_step ? ` · escalated ×${x.escalation_step}` : ""))) : null);
  const badgeEl = $("#alarm-badge");
  badgeEl.hidden = !a.counts.firing;
  fill(badgeEl, a.counts.firing || "");
  badgeEl.setAttribute("aria-label", `${a.counts.firing} firing`);

  const lat = Object.entries(now.ack_latency);
  fill($("#now-latency"), lat.length ? h("div", {class: "scroll"}, h("table", {class: "table compact"},
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "Platform"), h("th", {scope: "col", class: "num"}, "Acks"),
                    h("th", {scope: "col", class: "num"}, "Mean"), h("th", {scope: "col", class: "num"}, "p95 ≤"))),
    h("tbody", {}, lat.map(([p, l]) => h("tr", {}, h("td", {}, p), h("td", {class: "num"}, num(l.count)),
      h("td", {class: "num"}, ms(l.mean_ms)), h("td", {class: "num"}, ms(l.p95_le_ms)))))))
    : h("p", {class: "muted"}, "no acks yet"));
}
