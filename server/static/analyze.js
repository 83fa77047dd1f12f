// Analyze mode's data: one POST /v1/analyze over a given text (or prompt + completion), seen through
// the same interface as a streamed Generation (positions, query rows, attention rows, lens), so the
// page draws both with the same code. No DOM here.
//
// Positions 0..n-1 are the text's tokens (0 is the beginning-of-sequence token). Unlike a
// generation, every position is its own query row, the last one included: row q is where token q
// looked, and the logit lens at q is what the model would predict for position q + 1.

import { errorFromResponse, networkError } from "./stream.js";
import { pickHead } from "./generation.js";

/** What Analyze mode asks for: all attention, logprobs 5 and the lens on all layers (top 5). */
export function analyzeRequest({ model, prompt, completion }) {
  const request = {
    attention: { layers: "all", heads: "all" },
    logprobs: 5,
    logit_lens: { layers: "all", top_k: 5 },
  };
  if (model) request.model = model;
  if (completion) Object.assign(request, { prompt, completion });
  else request.text = prompt;
  return request;
}

/** POST v1/analyze; the parsed response, or throws ApiError (or the AbortError of `signal`). */
export async function postAnalyze(request, { apiKey = "", signal } = {}) {
  const headers = { "Content-Type": "application/json", Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  let response;
  try {
    // Relative to the page, as for generate: the viewer also works behind a path prefix.
    response = await fetch("v1/analyze", { method: "POST", headers, signal, body: JSON.stringify(request) });
  } catch (err) {
    throw networkError(err, "could not reach the server");
  }
  if (!response.ok) throw await errorFromResponse(response);
  return response.json();
}

/** "log p(completion | prompt) = …" for an Analysis that scored a completion. */
export function scoreText(analysis) {
  const n = analysis.size - analysis.completionStart;
  const logprob = analysis.completionLogprob;
  return `log p(completion | prompt) = ${logprob.toFixed(4)} `
    + `(p = ${(100 * Math.exp(logprob)).toPrecision(3)}%, ${n} token${n === 1 ? "" : "s"})`;
}

export class Analysis {
  /** `response`: /v1/analyze's body; `prompt`: the prompt when a completion was scored, else null. */
  constructor(response, { prompt = null } = {}) {
    this.model = response.model;
    this.tokens = response.tokens; // [{id, text, logprob (null at 0), top_logprobs}]
    this.attention = response.attention || null; // [layer][head][query][key ≤ query]
    this.lens = response.logit_lens || null; // {layers: [ℓ…], top: [layer index][query][k]}
    this.completionLogprob = response.completion_logprob ?? null;
    this.layers = this.attention ? this.attention.length : 0;
    this.heads = this.attention ? this.attention[0].length : 0;
    this.completionStart = prompt == null ? this.tokens.length : completionStart(this.tokens, prompt);
  }

  get size() {
    return this.tokens.length;
  }

  get rows() {
    return this.attention ? this.tokens.length : 0;
  }

  /** The prompt's last position: the answer-predicting one when a completion is scored. */
  get lastPromptPosition() {
    return this.completionStart - 1;
  }

  /** {id, text, logprob, top_logprobs, completion} of a position; never "generated" (nothing was). */
  tokenAt(pos) {
    return { ...this.tokens[pos], generated: false, completion: pos >= this.completionStart };
  }

  queryOf(pos) {
    return pos;
  }

  positionOfRow(q) {
    return q;
  }

  /** [head][key] of query q in `layer`. */
  headRows(q, layer) {
    return this.attention ? this.attention[layer].map((rows) => rows[q]) : null;
  }

  rowOf(layer, head) {
    return (q) => pickHead(this.headRows(q, layer), head);
  }

  /** The lens's layer indices, or [] when none was asked for. */
  get lensLayers() {
    return this.lens ? this.lens.layers : [];
  }

  /** How many query rows have a lens (every position). */
  get lensRows() {
    return this.lens ? this.tokens.length : 0;
  }

  /** [layer index][k] {id, text, prob} at query q. */
  lensAt(q) {
    return this.lens.top.map((perLayer) => perLayer[q]);
  }
}

/**
 * Where the completion's tokens begin: the first position after the tokens whose texts spell the
 * prompt (position 0, the beginning-of-sequence token, spells nothing). When no prefix spells it
 * exactly (a token spanning the boundary), the whole text counts as prompt.
 */
function completionStart(tokens, prompt) {
  let text = "";
  for (let pos = 1; pos < tokens.length; pos++) {
    text += tokens[pos].text;
    if (text === prompt) return pos + 1;
    if (text.length >= prompt.length) break;
  }
  return tokens.length;
}
