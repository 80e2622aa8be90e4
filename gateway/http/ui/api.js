// The page's JSON routes (/ui/api/...). Writes carry the session's CSRF token.

let csrf = null;
export function setCsrf(token) { csrf = token; }

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {code: "error", message: `HTTP ${status}`};
    super(err.message);
    this.status = status;
    this.code = err.code;
    this.fields = (body && body.fields) || [];
  }
}

async function call(method, path, body) {
  const headers = {Accept: "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const resp = await fetch(path, {method, headers, credentials: "same-origin",
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  if (resp.status === 401) {  // the session ended (logout elsewhere, expiry, account changed)
    window.location.assign("/");
    throw new ApiError(401, null);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export const get = (path, params) => {
  const qs = params ? new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined)) : "";
  return call("GET", qs && qs.toString() ? `${path}?${qs}` : path);
};
/** A ``get`` for one list whose answer counts only if no newer request of that list was made
 * meanwhile (it resolves to null then): a search or page asked while an earlier one (the tab's
 * first load, say) is still on its way is what the list shows, whichever answer comes last. */
export function newest() {
  let asked = 0;
  return async (path, params) => {
    const mine = ++asked;
    const answer = await get(path, params);
    return mine === asked ? answer : null;
  };
}
export const post = (path, body) => call("POST", path, body);
export const put = (path, body) => call("PUT", path, body);
export const del = (path) => call("DELETE", path);
