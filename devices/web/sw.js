/* homepot-gateway Web Push service worker (contract §10).
 *
 * A push carries the §8 envelope as JSON: message_id, job_id, title, body, data,
 * priority, sent_at, expires_at, ack_url, and optionally `notification` (the job's
 * options.webpush.notification: showNotification() options such as icon, badge, tag,
 * requireInteraction, actions, data). The worker shows the notification, then POSTs
 * {"status": "received"} to ack_url; a click POSTs "opened" (and opens data.url if the job
 * gave one), closing it without a click POSTs "dismissed". If the notification cannot be
 * shown it acks "failed" with the reason. An ack that gets no answer is tried three
 * times; a 4xx answer (a bad or expired URL) is final.
 */
'use strict';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

async function ack(ackUrl, status, error) {
  if (!ackUrl) return null;
  const body = {status, at: new Date().toISOString()};
  if (error) body.error = String(error).slice(0, 1000);
  for (let attempt = 1; attempt <= 3; attempt++) {
    try {
      const r = await fetch(ackUrl, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                     body: JSON.stringify(body), keepalive: true});
      if (r.ok || (r.status >= 400 && r.status < 500)) return r.status;
    } catch (e) { /* offline or the gateway restarting: try again */ }
    await new Promise((resolve) => setTimeout(resolve, 1000 * attempt));
  }
  return null;
}

function parse(data) {
  if (!data) return {};
  try { return data.json(); } catch (e) { return {body: data.text()}; }
}

self.addEventListener('push', (event) => {
  const msg = parse(event.data);
  const extra = (msg.notification && typeof msg.notification === 'object') ? msg.notification : {};
  const {title: extraTitle, ...options} = extra;
  const title = extraTitle || msg.title || 'Notification';
  options.body = options.body !== undefined ? options.body : (msg.body || '');
  // What the app (and the click handler) can read later: the job's data and the ids.
  options.data = Object.assign({}, msg.data || {}, extra.data || {},
                               {message_id: msg.message_id, job_id: msg.job_id, ack_url: msg.ack_url});
  if (!options.tag && msg.message_id) options.tag = msg.message_id;
  event.waitUntil(
    self.registration.showNotification(title, options)
      .then(() => ack(msg.ack_url, 'received'),
            (err) => ack(msg.ack_url, 'failed', 'showNotification: ' + err)));
});

self.addEventListener('notificationclick', (event) => {
  const data = event.notification.data || {};
  event.notification.close();
  const work = [ack(data.ack_url, 'opened')];
  if (data.url) work.push(self.clients.openWindow(data.url));
  event.waitUntil(Promise.all(work));
});

self.addEventListener('notificationclose', (event) => {
  const data = event.notification.data || {};
  event.waitUntil(ack(data.ack_url, 'dismissed'));
});
