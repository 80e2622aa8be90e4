// Numbers, ages, sizes and times the way an operator reads them.

const nf = new Intl.NumberFormat();
export const num = (n) => (n === null || n === undefined ? "–" : nf.format(n));

export function age(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60 ? `${s % 60} s` : ""}`.trim();
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr} h ${m % 60} min`;
  return `${Math.floor(hr / 24)} d ${hr % 24} h`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1000) return `${Math.round(v)} ms`;
  return `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`;
}

/** An ISO time as local time (with the date when not today), full ISO in the tooltip. */
export function time(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function agoText(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return `${age((Date.now() - d.getTime()) / 1000)} ago`;
}

/** "12 s ago" as a <time> element that keeps counting (see tickAges): an age drawn once
 * would read "2 s ago" for as long as nothing about its row changes. */
export function ago(iso) {
  if (!iso) return "–";
  const el = document.createElement("time");
  el.dateTime = iso;
  el.dataset.ago = iso;
  el.title = iso;
  el.textContent = agoText(iso);
  return el;
}

/** Redraw every age on the page from the clock; only the texts that changed are touched,
 * so screen readers and observers see one change per visible change. */
export function tickAges(root = document) {
  for (const el of root.querySelectorAll("[data-ago]")) {
    const text = agoText(el.dataset.ago);
    if (el.textContent !== text) el.textContent = text;
  }
}

export const AGE_TICK_MS = 1000;

export function value(v) {
  if (v === null || v === undefined) return "–";
  return typeof v === "string" ? v : JSON.stringify(v);
}
