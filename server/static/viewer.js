// The attention viewer: stream a generation with every layer's and head's attention, then show,
// for the chosen layer and head (or the mean over heads), one token's attention as a heatmap
// over its context and the whole [query × key] matrix. All switching happens here, client-side.
//
// Positions: 0..n-1 are the prompt tokens, n + i is generated token i. A prompt token's attention
// is its own query row (prompt_attention[l][h][q]); generated token i's attention is the row that
// *chose* it — the query at position n − 1 + i (API.md) — so row n − 1 is shared by the last
// prompt token and the first generated one. The matrix has a row per position that was a query.

import { renderHeatmap, renderLegend, renderMatrix, drawThumbnail, tokenLabel, tokenName } from "./render.js";
import { streamGenerate } from "./stream.js";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("generate-form"), prompt: $("prompt"), strategy: $("strategy"), temperature: $("temperature"),
  k: $("top-k"), p: $("top-p"), seed: $("seed"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  generate: $("generate"), stop: $("stop"), status: $("status"), error: $("error"), model: $("model"),
  tokens: $("tokens"), layer: $("layer"), head: $("head"), stretch: $("stretch"), legend: $("legend"),
  caption: $("heat-caption"), detail: $("heat-detail"), heatmap: $("heatmap"), matrix: $("matrix"),
  heads: $("heads"), readout: $("readout"), attention: $("attention"), empty: $("empty"),
};

const P_DEFAULTS = { top_p: 0.9, min_p: 0.05, typical: 0.9 };

const state = {
  prompt: [], // [{id, text}]
  promptAttention: null, // [layer][head][query][key]
  generated: [], // token events: {index, id, text, logprob, top_logprobs, attention: [layer][head][key]}
  layers: 0,
  heads: 0,
  layer: 0,
  head: "mean", // or a head index
  selected: null, // the selected position
  preview: null, // the position under the pointer, shown instead of the selection
  chosenByUser: false,
  controller: null, // AbortController of the running generation
  frame: 0,
};

// -- the request ---------------------------------------------------------------------------------
function buildRequest() {
  const strategy = ui.strategy.value;
  const sampling = { strategy };
  if (strategy !== "greedy") sampling.temperature = Number(ui.temperature.value);
  if (strategy === "top_k") sampling.k = Number(ui.k.value);
  if (strategy in P_DEFAULTS) sampling.p = Number(ui.p.value);
  const request = {
    prompt: ui.prompt.value,
    max_tokens: Number(ui.maxTokens.value),
    sampling,
    logprobs: 5,
    attention: { layers: "all", heads: "all", include_prompt: true },
  };
  if (ui.seed.value.trim() !== "") request.seed = Number(ui.seed.value);
  return request;
}

function showSamplingFields() {
  const strategy = ui.strategy.value;
  document.querySelectorAll("[data-for]").forEach((el) => {
    el.hidden = !el.dataset.for.split(" ").includes(strategy);
  });
  if (strategy in P_DEFAULTS) ui.p.value = P_DEFAULTS[strategy];
  ui.p.min = strategy === "min_p" ? "0" : "0.001";
  ui.p.max = strategy === "min_p" ? "0.999" : "1";
}

// -- streaming -----------------------------------------------------------------------------------
async function generate(event) {
  event.preventDefault();
  if (state.controller) return;
  const request = buildRequest();
  reset();
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  setStatus("Sending…");
  try {
    for await (const e of streamGenerate(request, { apiKey: ui.apiKey.value, signal: controller.signal })) {
      if (e.type === "start") onStart(e);
      else if (e.type === "token") onToken(e);
      else if (e.type === "done") onDone(e);
    }
  } catch (err) {
    if (err.name === "AbortError") setStatus(`Stopped after ${state.generated.length} tokens.`);
    else showError(err);
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

function onStart(e) {
  state.prompt = e.prompt_tokens;
  state.promptAttention = e.prompt_attention || null;
  if (state.promptAttention) {
    state.layers = state.promptAttention.length;
    state.heads = state.promptAttention[0].length;
  }
  ui.model.textContent = `${e.model} · ${state.layers} layers × ${state.heads} heads`;
  fillSelectors();
  state.prompt.forEach((t, pos) => addChip(pos, t, false));
  state.selected = state.prompt.length - 1;
  setStatus(`Prompt: ${state.prompt.length} tokens. Generating…`);
  scheduleRender();
}

function onToken(e) {
  state.generated.push(e);
  const pos = state.prompt.length + e.index;
  addChip(pos, e, true);
  if (!state.chosenByUser && e.index === 0) state.selected = pos; // show the answer's first token
  setStatus(`Generating… ${state.generated.length} tokens`);
  scheduleRender();
}

function onDone(e) {
  const t = e.timings || {};
  const parts = [`Finished (${e.finish_reason})`,
    `${e.usage.prompt_tokens} prompt + ${e.usage.completion_tokens} generated tokens`];
  if (t.ttft_ms != null) parts.push(`first token ${t.ttft_ms.toFixed(1)} ms`);
  if (t.tokens_per_second) parts.push(`${Math.round(t.tokens_per_second)} tokens/s`);
  setStatus(`${parts.join(" · ")}.`);
}

function reset() {
  Object.assign(state, { prompt: [], promptAttention: null, generated: [], selected: null, preview: null,
    chosenByUser: false });
  ui.tokens.replaceChildren();
  ui.error.hidden = true;
  ui.error.replaceChildren();
  render();
}

function setRunning(running) {
  ui.generate.disabled = running;
  ui.stop.disabled = !running;
  ui.form.setAttribute("aria-busy", String(running));
}

function setStatus(text) {
  ui.status.textContent = text;
}

function showError(err) {
  const title = document.createElement("strong");
  const where = err.fields && err.fields.during_stream ? "during the stream" : err.status ? `HTTP ${err.status}` : "";
  title.textContent = `Error${where ? ` (${where})` : ""}: ${err.type || err.name}`;
  const message = document.createElement("p");
  message.className = "error-message";
  message.textContent = err.message;
  ui.error.replaceChildren(title, message);
  const fields = Object.entries(err.fields || {}).filter(([k, v]) => k !== "during_stream" && v != null);
  if (fields.length) {
    const list = document.createElement("dl");
    for (const [k, v] of fields) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
      list.append(dt, dd);
    }
    ui.error.append(list);
  }
  ui.error.hidden = false;
  setStatus(state.generated.length ? `Failed after ${state.generated.length} tokens.` : "Failed.");
}

// -- the attention data --------------------------------------------------------------------------
const positionCount = () => state.prompt.length + state.generated.length;

function tokenAt(pos) {
  const n = state.prompt.length;
  return pos < n ? { ...state.prompt[pos], generated: false } : { ...state.generated[pos - n], generated: true };
}

/** The query row a position's attention is: its own for the prompt, the choosing one when generated. */
const queryOf = (pos) => (pos < state.prompt.length ? pos : pos - 1);

/** [head][key] of query q in `layer`, or null when the server sent no such row. */
function headRows(q, layer) {
  const n = state.prompt.length;
  if (q < n - 1 || (q === n - 1 && !state.generated.length)) {
    return state.promptAttention ? state.promptAttention[layer].map((rows) => rows[q]) : null;
  }
  const token = state.generated[q - n + 1];
  return token && token.attention ? token.attention[layer] : null;
}

/** One head's row, or the mean over heads (computed here: the page asks for every head). */
function pick(rows, head) {
  if (head !== "mean") return rows[head];
  return rows[0].map((_, k) => {
    let sum = 0;
    for (const row of rows) sum += row[k];
    return sum / rows.length;
  });
}

/** How many rows the matrix has: every position that was a query (all but the last token). */
function matrixRows() {
  if (!state.promptAttention) return 0;
  return state.prompt.length + Math.max(0, state.generated.length - 1);
}

const rowOf = (layer, head) => (q) => pick(headRows(q, layer), head);

// -- rendering -----------------------------------------------------------------------------------
function addChip(pos, token, generated) {
  const chip = document.createElement("button");
  chip.type = "button";
  chip.className = generated ? "tok generated" : "tok prompt";
  chip.dataset.pos = String(pos);
  chip.setAttribute("aria-pressed", "false");
  chip.title = `position ${pos} · id ${token.id} · ${tokenName(token.text)}`;
  if (token.text === "") chip.setAttribute("aria-label", `position ${pos}, token ${token.id} with no text`);
  const index = document.createElement("span");
  index.className = "tok-pos";
  index.textContent = pos;
  chip.append(tokenLabel(token.text), index);
  ui.tokens.append(chip);
}

function scheduleRender() {
  if (!state.frame) state.frame = requestAnimationFrame(() => {
    state.frame = 0;
    render();
  });
}

function scaleMax(rows, layer, head) {
  if (!ui.stretch.checked || !rows) return 1;
  let max = 0;
  const row = rowOf(layer, head);
  for (let q = 0; q < rows; q++) for (const w of row(q)) max = Math.max(max, w);
  return max || 1;
}

function render() {
  const rows = matrixRows();
  ui.attention.hidden = rows === 0;
  ui.empty.hidden = rows !== 0;
  for (const chip of ui.tokens.children) {
    chip.setAttribute("aria-pressed", String(Number(chip.dataset.pos) === state.selected));
  }
  if (!rows) return;
  const { layer, head } = state;
  const max = scaleMax(rows, layer, head);
  renderLegend(ui.legend, max);
  renderSelection(max);
  const tokens = Array.from({ length: positionCount() }, (_, pos) => tokenAt(pos));
  const selectedQuery = state.selected == null ? null : queryOf(state.selected);
  renderMatrix(ui.matrix, { tokens, rows, rowOf: rowOf(layer, head), layer, head, scaleMax: max, selectedQuery });
  renderHeads(rows, max);
}

/** The heatmap and caption for the previewed (hovered) position, else the selected one. */
function renderSelection(max = scaleMax(matrixRows(), state.layer, state.head)) {
  const pos = state.preview ?? state.selected;
  if (pos == null || pos >= positionCount()) return;
  const q = queryOf(pos);
  const rows = headRows(q, state.layer);
  if (!rows) {
    ui.heatmap.replaceChildren();
    return;
  }
  const token = tokenAt(pos);
  const keys = Array.from({ length: q + 1 }, (_, k) => tokenAt(k));
  renderHeatmap(ui.heatmap, { keys, weights: pick(rows, state.head), layer: state.layer, head: state.head,
    query: q, scaleMax: max });
  ui.heatmap.dataset.pos = String(pos);
  ui.caption.replaceChildren(...(token.generated
    ? ["Choosing ", chipOf(token), ` (position ${pos}): where the query at `, chipOf(tokenAt(q)),
      ` (position ${q}) looked`]
    : ["Where ", chipOf(token), ` (position ${pos}) looks`]));
  const headName = state.head === "mean" ? `mean of ${state.heads} heads` : `head ${state.head}`;
  const detail = [`layer ${state.layer} · ${headName}`];
  if (token.generated && token.logprob != null) {
    detail.push(` · chosen with p = ${percent(token.logprob)}`);
    const others = (token.top_logprobs || []).filter((t) => t.id !== token.id).slice(0, 3);
    if (others.length) detail.push(" · runners-up:");
    for (const t of others) detail.push(" ", chipOf(t), ` ${percent(t.logprob)}`);
  }
  ui.detail.replaceChildren(...detail);
  for (const tr of ui.matrix.tBodies[0]?.rows || []) {
    tr.classList.toggle("selected", Number(tr.dataset.query) === q);
  }
}

const percent = (logprob) => `${(100 * Math.exp(logprob)).toFixed(1)}%`;

function chipOf(token) {
  const span = document.createElement("span");
  span.className = token.generated ? "inline-tok generated" : "inline-tok";
  span.append(tokenLabel(token.text));
  return span;
}

function renderHeads(rows, max) {
  const choices = ["mean", ...Array.from({ length: state.heads }, (_, h) => h)];
  if (ui.heads.children.length !== choices.length) {
    ui.heads.replaceChildren(...choices.map((head) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "head-thumb";
      button.dataset.head = String(head);
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = 84;
      canvas.setAttribute("aria-hidden", "true");
      const label = document.createElement("span");
      label.textContent = head === "mean" ? "mean" : `head ${head}`;
      button.append(canvas, label);
      button.setAttribute("aria-label", `show ${head === "mean" ? "the mean over heads" : `head ${head}`}`);
      return button;
    }));
  }
  for (const button of ui.heads.children) {
    const head = button.dataset.head === "mean" ? "mean" : Number(button.dataset.head);
    button.setAttribute("aria-pressed", String(head === state.head));
    drawThumbnail(button.querySelector("canvas"), { rows, rowOf: rowOf(state.layer, head), scaleMax: max });
  }
}

function fillSelectors() {
  const layer = Math.min(state.layer, state.layers - 1);
  ui.layer.replaceChildren(...Array.from({ length: state.layers }, (_, l) => new Option(`layer ${l}`, String(l))));
  ui.layer.value = String(Math.max(layer, 0));
  state.layer = Math.max(layer, 0);
  if (state.head !== "mean" && state.head >= state.heads) state.head = "mean";
  ui.head.replaceChildren(new Option("mean of heads", "mean"),
    ...Array.from({ length: state.heads }, (_, h) => new Option(`head ${h}`, String(h))));
  ui.head.value = String(state.head);
}

// -- interaction ---------------------------------------------------------------------------------
function select(pos, { focus = false } = {}) {
  if (pos == null || pos < 0 || pos >= positionCount()) return;
  state.selected = pos;
  state.chosenByUser = true;
  state.preview = null;
  render();
  if (focus) ui.tokens.querySelector(`[data-pos="${pos}"]`)?.focus();
}

function setHead(head) {
  state.head = head;
  ui.head.value = String(head);
  render();
}

ui.form.addEventListener("submit", generate);
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.strategy.addEventListener("change", showSamplingFields);
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ui.form.requestSubmit();
});
ui.layer.addEventListener("change", () => {
  state.layer = Number(ui.layer.value);
  render();
});
ui.head.addEventListener("change", () => setHead(ui.head.value === "mean" ? "mean" : Number(ui.head.value)));
ui.stretch.addEventListener("change", render);
ui.heads.addEventListener("click", (e) => {
  const button = e.target.closest(".head-thumb");
  if (button) setHead(button.dataset.head === "mean" ? "mean" : Number(button.dataset.head));
});

ui.tokens.addEventListener("click", (e) => {
  const chip = e.target.closest(".tok");
  if (chip) select(Number(chip.dataset.pos));
});
ui.tokens.addEventListener("keydown", (e) => {
  const chip = e.target.closest(".tok");
  if (!chip) return;
  const pos = Number(chip.dataset.pos);
  const moves = { ArrowLeft: pos - 1, ArrowRight: pos + 1, Home: 0, End: positionCount() - 1 };
  if (e.key in moves) {
    e.preventDefault();
    select(moves[e.key], { focus: true });
  }
});
ui.tokens.addEventListener("pointerover", (e) => {
  const chip = e.target.closest(".tok");
  const pos = chip ? Number(chip.dataset.pos) : null;
  if (pos !== state.preview && matrixRows()) {
    state.preview = pos;
    renderSelection();
  }
});
ui.tokens.addEventListener("pointerleave", () => {
  if (state.preview != null) {
    state.preview = null;
    renderSelection();
  }
});

// A matrix row is a query: select the token it chose (generated) or the prompt token itself.
ui.matrix.addEventListener("click", (e) => {
  const tr = e.target.closest("tbody tr");
  if (!tr) return;
  const q = Number(tr.dataset.query);
  select(q >= state.prompt.length - 1 && state.generated.length ? q + 1 : q);
});
ui.matrix.addEventListener("pointerover", (e) => {
  const td = e.target.closest("td[data-weight]");
  if (!td) return;
  const { query, key, weight } = td.dataset;
  ui.readout.textContent = `query ${query} ${tokenName(tokenAt(Number(query)).text)} → key ${key} `
    + `${tokenName(tokenAt(Number(key)).text)}: ${weight}`;
});

showSamplingFields();
render();
