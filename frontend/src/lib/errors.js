// Server error codes in words. The node's own message is kept as detail.

const WORDS = {
  rate_limited: 'You are sending messages too fast. Wait a moment, then retry.',
  too_large: 'This message is too long. Shorten it and send it again.',
  unavailable: 'The server could not store this message right now. Retry in a moment.',
  not_joined: 'You are not in this room any more. Rejoining…',
  bad_request: 'The server refused this request.',
  forbidden: 'You are not allowed to do that.',
  internal: 'Something went wrong on the server.',
  timeout: 'No answer from the server.',
  network: 'Cannot reach the server.',
};

/** Codes where re-sending the same message may succeed. */
const RETRYABLE = new Set(['rate_limited', 'unavailable', 'timeout', 'network', 'internal', 'not_joined']);

/** Short label for a failed message. */
export function errorLabel(code) {
  switch (code) {
    case 'rate_limited':
      return 'Not sent: rate limited';
    case 'too_large':
      return 'Not sent: too long';
    case 'unavailable':
      return 'Not sent: server unavailable';
    case 'timeout':
      return 'Not sent: no answer';
    case 'forbidden':
      return 'Not sent: not allowed';
    case 'bad_request':
      return 'Not sent: refused';
    default:
      return 'Not sent';
  }
}

/** "text is long" → "Text is long." */
function sentence(s) {
  const t = s.charAt(0).toUpperCase() + s.slice(1);
  return /[.!?…]$/.test(t) ? t : `${t}.`;
}

/**
 * Turns an error (a frame `{code, message}` or a local code) into what the
 * user reads.
 * @returns {{code: string, text: string, detail: string, retryable: boolean, label: string}}
 */
export function describeError(code, message) {
  const c = String(code || 'internal');
  const words = WORDS[c];
  const detail = typeof message === 'string' ? message.trim() : '';
  let text = words || detail || 'The server reported an error.';
  if (c === 'bad_request' && detail) text = `The server refused this: ${detail}`;
  if (c === 'forbidden' && detail) text = `Not allowed: ${detail}`;
  if (c === 'too_large' && detail) text = sentence(detail);
  return { code: c, text, detail, retryable: RETRYABLE.has(c), label: errorLabel(c) };
}
