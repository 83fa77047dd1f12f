// One streamed generation's tokens and attention, seen as positions and query rows (no DOM here).
//
// Positions: 0..n-1 are the prompt tokens, n + i is generated token i. A prompt token's attention
// is its own query row (prompt_attention[l][h][q]); generated token i's attention is the row that
// *chose* it — the query at position n − 1 + i (API.md) — so row n − 1 is shared by the last
// prompt token and the first generated one. The matrix has a row per position that was a query:
// every position but the last.

export class Generation {
  constructor() {
    this.model = "";
    this.prompt = []; // [{id, text}]
    this.promptAttention = null; // [layer][head][query][key]
    this.promptLens = null; // [layer][query][k] {id, text, prob}, when the lens was asked for
    this.tokens = []; // token events: {index, id, text, logprob, top_logprobs, attention: [layer][head][key]}
    this.layers = 0;
    this.heads = 0;
  }

  /** The start event: the prompt's tokens and attention (which also tell the model's shape). */
  start(event) {
    this.model = event.model;
    this.prompt = event.prompt_tokens;
    this.promptAttention = event.prompt_attention || null;
    this.promptLens = event.prompt_logit_lens || null;
    if (this.promptAttention) {
      this.layers = this.promptAttention.length;
      this.heads = this.promptAttention[0].length;
    }
  }

  /** A token event; returns its position. */
  add(event) {
    this.tokens.push(event);
    return this.prompt.length + event.index;
  }

  get size() {
    return this.prompt.length + this.tokens.length;
  }

  /** How many query rows the matrix has (0 before the prompt's attention came). */
  get rows() {
    return this.promptAttention ? this.prompt.length + Math.max(0, this.tokens.length - 1) : 0;
  }

  isGenerated(pos) {
    return pos >= this.prompt.length;
  }

  /** {id, text, generated, …} of a position; a generated token's text is `shownText`. */
  tokenAt(pos) {
    const n = this.prompt.length;
    if (pos < n) return { ...this.prompt[pos], generated: false };
    const token = this.tokens[pos - n];
    return { ...token, text: shownText(token), generated: true };
  }

  /** The query row that is a position's attention: its own (prompt), the choosing one (generated). */
  queryOf(pos) {
    return pos < this.prompt.length ? pos : pos - 1;
  }

  /** The position a matrix row selects: the token the row chose when generated, else the row's own. */
  positionOfRow(q) {
    return q >= this.prompt.length - 1 && this.tokens.length ? q + 1 : q;
  }

  /** [head][key] of query q in `layer`, or null when the server sent no such row. */
  headRows(q, layer) {
    const n = this.prompt.length;
    if (q < n - 1 || (q === n - 1 && !this.tokens.length)) {
      return this.promptAttention ? this.promptAttention[layer].map((rows) => rows[q]) : null;
    }
    const token = this.tokens[q - n + 1];
    return token && token.attention ? token.attention[layer] : null;
  }

  /** The lens's layers (every layer: the page asks for "all"), or [] when it was not asked for. */
  get lensLayers() {
    return this.promptLens ? this.promptLens.map((_, l) => l) : [];
  }

  /** How many query rows have a lens: the same rows as the attention matrix. */
  get lensRows() {
    return this.promptLens ? this.prompt.length + Math.max(0, this.tokens.length - 1) : 0;
  }

  /**
   * [layer][k] {id, text, prob} at query q: the prompt's own row, or the step that chose the next
   * token (its token event's logit_lens), as for attention.
   */
  lensAt(q) {
    const n = this.prompt.length;
    if (q < n - 1 || (q === n - 1 && !this.tokens.length)) return this.promptLens.map((rows) => rows[q]);
    return this.tokens[q - n + 1].logit_lens;
  }

  /** q → the weights of query q for one head (or "mean") of a layer. */
  rowOf(layer, head) {
    return (q) => pickHead(this.headRows(q, layer), head);
  }
}

/** One head's row, or the mean over heads (computed here: the page asks for every head). */
export function pickHead(rows, head) {
  if (head !== "mean") return rows[head];
  return rows[0].map((_, k) => {
    let sum = 0;
    for (const row of rows) sum += row[k];
    return sum / rows.length;
  });
}

/**
 * What a generated token is shown as: the text it added, or, when it added none (the end-of-sequence
 * token, or bytes held back until a UTF-8 character is complete), its own text from top_logprobs
 * when it is there ("<|eos|>"); else "" (shown as ∅).
 */
export function shownText(token) {
  if (token.text !== "") return token.text;
  const self = (token.top_logprobs || []).find((t) => t.id === token.id);
  return self ? self.text : "";
}
