// POST /v1/generate with `stream: true` and yield its NDJSON events (API.md) as they arrive:
// start → token* → done | error, one JSON object per line. Every failure becomes an ApiError,
// so the page has one place to show it: refusals before the stream (400, 401, 422, 429, …),
// an error event during the stream, a broken connection, a stream cut off without done/error.

export class ApiError extends Error {
  constructor(status, type, message, fields = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status; // the HTTP status; 0 when no response (or no complete one) came
    this.type = type; // e.g. "context_length_exceeded", "unauthorized", "network_error"
    this.fields = fields; // the error's other fields, e.g. {prompt_tokens: 9, max_context: 8}
  }
}

/** Yield each event of one streamed generation; throws ApiError (or the AbortError of `signal`). */
export async function* streamGenerate(request, { apiKey = "", signal } = {}) {
  const headers = { "Content-Type": "application/json", Accept: "application/x-ndjson" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  let response;
  try {
    // Relative to the page, so that the viewer also works behind a proxy that adds a path prefix.
    response = await fetch("v1/generate", {
      method: "POST", headers, signal, body: JSON.stringify({ ...request, stream: true }),
    });
  } catch (err) {
    throw networkError(err, "could not reach the server");
  }
  if (!response.ok) throw await errorFromResponse(response);

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = ""; // the text after the last newline: an incomplete line
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      throw networkError(err, "the connection broke during the stream");
    }
    pending += chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
    const lines = pending.split("\n");
    pending = chunk.done ? "" : lines.pop();
    for (const line of lines) {
      if (!line.trim()) continue;
      const event = parseLine(line);
      if (event.type === "error") {
        const { type, message, ...fields } = event.error || {};
        throw new ApiError(response.status, type || "error", message || "the server reported an error",
          { ...fields, during_stream: true });
      }
      yield event;
      if (event.type === "done") return;
    }
    if (chunk.done) {
      throw new ApiError(0, "stream_cut_off",
        "The stream ended without a final done or error event: the connection was cut off.");
    }
  }
}

function parseLine(line) {
  try {
    return JSON.parse(line);
  } catch {
    throw new ApiError(0, "bad_stream", `The server sent a line that is not JSON: ${line.slice(0, 200)}`);
  }
}

export function networkError(err, what) {
  if (err && err.name === "AbortError") return err;
  return new ApiError(0, "network_error", `${what}: ${err && err.message ? err.message : err}`);
}

/** The error a non-2xx response describes: API.md's {"error": {...}}, FastAPI's 422 detail, or text. */
export async function errorFromResponse(response) {
  const status = response.status;
  const text = await response.text().catch(() => "");
  const retryAfter = response.headers.get("Retry-After");
  const extra = retryAfter ? { retry_after_s: retryAfter } : {};
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON (a proxy's page, a plain-text 413): show the text itself
  }
  if (body && body.error && typeof body.error === "object") {
    const { type, message, ...fields } = body.error;
    return new ApiError(status, type || `http_${status}`, message || text, { ...fields, ...extra });
  }
  if (body && Array.isArray(body.detail)) {
    const message = body.detail
      .map((d) => `${(d.loc || []).filter((part) => part !== "body").join(".") || "request"}: ${d.msg}`)
      .join("\n");
    return new ApiError(status, "invalid_request", message, extra);
  }
  if (body && typeof body.detail === "string") return new ApiError(status, `http_${status}`, body.detail, extra);
  return new ApiError(status, `http_${status}`, text.trim() || response.statusText || "request failed", extra);
}
