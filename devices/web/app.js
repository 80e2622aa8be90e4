/* homepot-gateway Web Push client page: subscribe this browser and register it as a device.
 *
 * 1. GET /web/config.json for the gateway's VAPID public key.
 * 2. Register sw.js (scope /web/), ask for notification permission, subscribe with the key.
 * 3. PUT /v1/devices/<id> with the subscription, as a `device` account whose name is the
 *    device id (or any technician/controller/admin account): HTTP Basic.
 * 4. On every load (and when the browser comes back online) ask the service worker to send
 *    the acks it still holds (sw.js keeps them in IndexedDB until the gateway takes them).
 * Everything is exposed as window.homepot so a kiosk script or a test can drive it; other
 * pages of the gateway (a person's /me) load this file from /web/ and use it the same way,
 * so its own files are found next to it, not next to the page that loaded it.
 */
'use strict';

const HERE = new URL('.', (document.currentScript && document.currentScript.src) || window.location.href);

function b64urlToBytes(text) {
  const pad = '='.repeat((4 - (text.length % 4)) % 4);
  const raw = atob((text + pad).replace(/-/g, '+').replace(/_/g, '/'));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

function basic(user, password) {
  const bytes = new TextEncoder().encode(user + ':' + password);
  let binary = '';
  bytes.forEach((b) => { binary += String.fromCharCode(b); });
  return 'Basic ' + btoa(binary);
}

function say(text, isError) {
  const el = document.getElementById('status');
  if (el) { el.textContent = text; el.className = isError ? 'error' : 'ok'; }
  return text;
}

async function config() {
  const r = await fetch(new URL('config.json', HERE), {cache: 'no-store'});
  if (!r.ok) throw new Error('config.json: HTTP ' + r.status);
  return r.json();
}

// The registration once its worker is active. Not navigator.serviceWorker.ready: that waits
// for a worker whose scope covers the page, which never comes for a page outside /web/.
function activated(reg) {
  if (reg.active) return Promise.resolve(reg);
  const worker = reg.installing || reg.waiting;
  return new Promise((resolve, reject) => {
    worker.addEventListener('statechange', () => {
      if (worker.state === 'activated') resolve(reg);
      else if (worker.state === 'redundant') reject(new Error('the service worker failed to install'));
    });
  });
}

async function registerWorker() {
  return activated(await navigator.serviceWorker.register(new URL('sw.js', HERE), {scope: HERE.pathname}));
}

async function subscribe() {
  const cfg = await config();
  if (!cfg.vapid_public_key) throw new Error('the gateway has no Web Push key ([bridges.webpush] is off)');
  const permission = await Notification.requestPermission();
  if (permission !== 'granted') throw new Error('notification permission: ' + permission);
  const reg = await registerWorker();
  const existing = await reg.pushManager.getSubscription();
  if (existing) return existing.toJSON();
  const sub = await reg.pushManager.subscribe({userVisibleOnly: true,
                                               applicationServerKey: b64urlToBytes(cfg.vapid_public_key)});
  return sub.toJSON();
}

async function register(deviceId, subscription, user, password, segment) {
  const device = {device_id: deviceId, channels: [{platform: 'webpush', subscription}]};
  if (segment) device.segment = segment;
  const r = await fetch('/v1/devices/' + encodeURIComponent(deviceId), {
    method: 'PUT', headers: {'Content-Type': 'application/json', 'Authorization': basic(user, password)},
    body: JSON.stringify(device)});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error('register: HTTP ' + r.status + ' ' + ((body.error && body.error.message) || ''));
  return body;
}

async function enable(deviceId, user, password, segment) {
  try {
    const sub = await subscribe();
    await register(deviceId, sub, user || deviceId, password, segment);
    return say('registered ' + deviceId + ' for notifications');
  } catch (err) {
    say(String(err.message || err), true);
    throw err;
  }
}

async function flushAcks() {
  if (!('serviceWorker' in navigator)) return false;
  const reg = await navigator.serviceWorker.getRegistration(HERE.href);
  const worker = reg && (reg.active || reg.waiting || reg.installing);
  if (!worker) return false;
  worker.postMessage({type: 'flush-acks'});
  return true;
}

window.homepot = {config, registerWorker, subscribe, register, enable, flushAcks};

window.addEventListener('online', () => { flushAcks().catch(() => {}); });

document.addEventListener('DOMContentLoaded', () => {
  flushAcks().catch(() => {});
  const form = document.getElementById('enable');
  if (!form) return;
  registerWorker().catch((err) => say('service worker: ' + err, true));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const f = new FormData(form);
    enable(f.get('device_id'), f.get('user'), f.get('password'), f.get('segment')).catch(() => {});
  });
});
