// Reconnect delays: exponential growth with jitter, so a node restart does
// not bring every client back in the same instant.

/**
 * Delay before reconnect attempt number `attempt` (1 for the first retry).
 * "Equal jitter": half the exponential step is fixed, half is random, so the
 * delay is never close to zero and never above `maxMs`.
 * @param {number} attempt
 * @param {{baseMs?: number, maxMs?: number, random?: () => number}} [opts]
 */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 30000, random = Math.random } = {}) {
  const n = Math.max(1, Math.floor(attempt));
  const step = Math.min(maxMs, baseMs * 2 ** Math.min(n - 1, 30));
  const half = step / 2;
  return Math.round(half + random() * half);
}
