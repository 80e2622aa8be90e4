/* homepot-gateway Web Push service worker (contract §10).
 *
 * A push carries the §8 envelope as JSON: message_id, job_id, title, body, data,
 * priority, sent_at, expires_at, ack_url, and optionally `notification` (the job's
 * options.webpush.notification: showNotification() options such as icon, badge, tag,
 * requireInteraction, actions, data). The worker shows the notification, then POSTs
 * {"status": "received"} to ack_url; a click POSTs "opened" (and opens data.url if the job
 * gave one), closing it without a click POSTs "dismissed". If the notification cannot be
 * shown it acks "failed" with the reason.
 *
 * Acks are not lost when the gateway cannot take them (503 on a full disk, refused
 * connections while it restarts, the phone offline): each ack is written to IndexedDB
 * first and removed only when the gateway answered 2xx, or a 4xx that retrying cannot
 * change (a bad or unknown URL; 408 and 429 are retried). Unsent acks are retried with a
 * doubling backoff (1 s .. 5 min, jittered) that honours the gateway's Retry-After, for as
 * long as the browser lets the event that sent them run (FLUSH_BUDGET_MS); whatever is
 * left is sent on the next push, when the worker activates, and when a page of the app
 * loads (app.js posts {type: "flush-acks"}). An ack older than MAX_AGE_MS is dropped.
 */
'use strict';

const DB_NAME = 'homepot-acks';
const STORE = 'acks';
const FLUSH_BUDGET_MS = 3 * 60 * 1000;  // browsers stop an event's work after a few minutes
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 5 * 60 * 1000;
const MAX_AGE_MS = 7 * 24 * 3600 * 1000;
const FETCH_TIMEOUT_MS = 15000;

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim().then(() => flushAcks())));
self.addEventListener('message', (event) => {
  if (event.data && event.data.type === 'flush-acks') event.waitUntil(flushAcks());
});

// ------------------------------------------------------------------ the ack outbox (IndexedDB)
function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, {keyPath: 'id', autoIncrement: true});
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function withStore(mode, fn) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const result = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(result && 'result' in result ? result.result : undefined);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

const putAck = (rec) => withStore('readwrite', (s) => s.put(rec));
const deleteAck = (id) => withStore('readwrite', (s) => s.delete(id));
const allAcks = () => withStore('readonly', (s) => s.getAll());

// ------------------------------------------------------------------ sending
function retryAfterMs(response) {
  const value = response.headers.get('Retry-After');
  if (!value) return null;
  if (/^\s*\d+\s*$/.test(value)) return parseInt(value, 10) * 1000;
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, at - Date.now());
}

function backoffMs(tries) {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.max(0, tries - 1));
  return base / 2 + Math.random() * base / 2;
}

/* One POST. Returns {done: true} when the ack needs no more sending, else {waitMs}. */
async function post(rec) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
  try {
    const r = await fetch(rec.url, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                    body: rec.body, signal: ctrl.signal, cache: 'no-store'});
    if (r.ok) return {done: true, status: r.status};
    if (r.status >= 400 && r.status < 500 && r.status !== 408 && r.status !== 429) {
      return {done: true, status: r.status};  // retrying cannot make this URL or body valid
    }
    const asked = retryAfterMs(r);
    return {done: false, status: r.status, waitMs: Math.max(asked === null ? 0 : asked, backoffMs(rec.tries))};
  } catch (e) {  // offline, refused (the gateway restarting), timed out
    return {done: false, status: null, waitMs: backoffMs(rec.tries)};
  } finally {
    clearTimeout(timer);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let flushing = null;
let kick = null;  // ends the running flush's wait early: a new ack must not wait for an old one's backoff

function wait(ms) {
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); kick = null; resolve(); };
    const timer = setTimeout(done, ms);
    kick = done;
  });
}

/* Send every stored ack that is due; wait for the next one while the budget lasts.
 * One flush at a time per worker: a flush asked for meanwhile joins the running one,
 * which looks at the store again before it ends. */
function flushAcks(budgetMs = FLUSH_BUDGET_MS) {
  if (flushing) {
    flushing.again = true;
    if (kick) kick();
    return flushing.promise;
  }
  const state = {again: false, promise: null};
  flushing = state;
  state.promise = (async () => {
    const until = Date.now() + budgetMs;
    try {
      for (;;) {
        state.again = false;
        let next = Infinity;
        for (const rec of await allAcks()) {
          const now = Date.now();
          if (now - rec.created > MAX_AGE_MS) { await deleteAck(rec.id); continue; }
          if (rec.nextAt > now) { next = Math.min(next, rec.nextAt); continue; }
          rec.tries += 1;
          rec.lastAt = now;
          const result = await post(rec);
          if (result.done) {
            await deleteAck(rec.id);
          } else {
            rec.nextAt = Date.now() + result.waitMs;
            rec.lastStatus = result.status;
            await putAck(rec);
            next = Math.min(next, rec.nextAt);
          }
        }
        if (state.again) continue;
        if (next === Infinity || next > until) return;
        await wait(Math.max(0, next - Date.now()));
      }
    } finally {
      flushing = null;
    }
  })();
  return state.promise;
}

/* Store the ack, then send it (and any older unsent ones). */
async function ack(ackUrl, status, error) {
  if (!ackUrl) return;
  const body = {status, at: new Date().toISOString()};
  if (error) body.error = String(error).slice(0, 1000);
  const rec = {url: ackUrl, body: JSON.stringify(body), created: Date.now(), tries: 0, nextAt: 0};
  try {
    await putAck(rec);
  } catch (e) {  // no IndexedDB (private mode, quota): send it at least while this event lives
    for (let tries = 1; Date.now() - rec.created < FLUSH_BUDGET_MS; tries++) {
      const result = await post({...rec, tries});
      if (result.done) return;
      await sleep(result.waitMs);
    }
    return;
  }
  await flushAcks();
}

// ------------------------------------------------------------------ events
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
            (err) => ack(msg.ack_url, 'failed', 'showNotification: ' + err))
      .then(() => flushAcks()));  // acks left from earlier events go out too
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

// For the app page and tests: what is still unsent.
self.homepotAcks = {flush: flushAcks, pending: allAcks};
