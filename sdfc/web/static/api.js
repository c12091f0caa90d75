// The HTTP API, same origin: the browser sends the Basic credentials it was given at the login prompt.
export class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!response.ok) throw new ApiFailure(response.status, describe(data) || `HTTP ${response.status}`);
  return data;
}

function describe(data) {
  if (!data || typeof data !== "object") return typeof data === "string" ? data.slice(0, 300) : "";
  if (typeof data.detail === "string") return data.detail;
  if (Array.isArray(data.detail)) return data.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return data.error || "";
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function showError(element, error) {
  element.hidden = !error;
  element.textContent = error ? String(error.message || error) : "";
}
