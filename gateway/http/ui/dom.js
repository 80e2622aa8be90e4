// Tiny DOM helpers. Text always goes in as text (textContent), never as HTML: nothing the
// gateway stores (device ids, alarm values, error messages) can become markup.

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

/** h("td", {class: "x", "aria-label": "y", onclick: fn}, "text", child, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A definition list of [label, value] pairs. */
export function facts(pairs) {
  return h("dl", {class: "facts"}, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function badge(text, kind) {
  return h("span", {class: `badge ${kind || text}`}, text);
}

/** Put a detail panel right under the row it belongs to, where the operator's eyes are: in
 * a slot of the row's own kind (an <li> in a list, a full-width <tr> in a table). With no
 * such row shown (another page, an id from a link) it goes to ``home``, above the list. */
export function placeDetail(section, row, home) {
  const slot = section.parentElement ? section.parentElement.closest(".detail-slot") : null;
  if (!row) {
    if (section.parentElement !== home) home.append(section);
    if (slot) slot.remove();
    return;
  }
  const isRow = row.tagName === "TR";
  let target = slot;
  if (!target || target.tagName !== (isRow ? "TR" : "LI")) {
    if (slot) slot.remove();
    target = isRow ? h("tr", {class: "detail-slot"}, h("td", {colspan: row.cells.length}))
                   : h("li", {class: "detail-slot"});
  }
  const holder = isRow ? target.firstElementChild : target;
  if (section.parentElement !== holder) holder.append(section);
  if (row.nextElementSibling !== target) row.after(target);
}

/** Bring an opened detail into view. ``always`` (opened by a link, or from another tab):
 * its row (or the detail) goes to the top. Otherwise (a click on its row) nothing moves while
 * the detail's start is on screen; else its row goes to the top, the detail right below. */
export function revealDetail(section, row, always) {
  const top = section.getBoundingClientRect().top;
  if (!always && top >= 0 && top <= window.innerHeight * 0.6) return;
  (row || section).scrollIntoView({block: "start"});
}
