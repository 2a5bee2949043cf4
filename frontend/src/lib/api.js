// The node's HTTP API, as far as the web client uses it.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

async function call(fetchImpl, url, init) {
  let res;
  try {
    res = await fetchImpl(url, init);
  } catch (e) {
    throw new ApiError(0, 'network', 'Cannot reach the server.');
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const err = body && body.error;
    throw new ApiError(res.status, err?.code || `http_${res.status}`, err?.message || `HTTP ${res.status}`);
  }
  return body;
}

/** @param {{base?: string, fetch?: typeof fetch}} [opts] */
export function createApi({ base = '', fetch: fetchImpl = (...a) => fetch(...a) } = {}) {
  const json = { 'Content-Type': 'application/json' };
  return {
    /** @returns {Promise<{token: string, user: {id: string, name: string}}>} */
    guest: (name) =>
      call(fetchImpl, `${base}/api/v1/auth/guest`, { method: 'POST', headers: json, body: JSON.stringify({ name }) }),
    /** @returns {Promise<{user: {id: string, name: string}}>} */
    me: (token) => call(fetchImpl, `${base}/api/v1/me`, { headers: { Authorization: `Bearer ${token}` } }),
    /** @returns {Promise<{rooms: {name: string, members: number, last_seq: number}[]}>} */
    rooms: () => call(fetchImpl, `${base}/api/v1/rooms`, {}),
  };
}
