// The attention viewer: stream a generation (Generate mode) or analyze a given text (Analyze mode)
// with every layer's and head's attention, then show, for the chosen layer and head (or the mean
// over heads), one token's attention as a heatmap over its context, the whole [query × key]
// matrix, and the logit lens. All switching happens here, client-side. Which row is which
// token's attention: see generation.js and analyze.js, which both answer the same questions.

import { Analysis, analyzeRequest, postAnalyze, scoreText } from "./analyze.js";
import { Generation, pickHead } from "./generation.js";
import { LENS_GRADIENT, SURPRISAL_GRADIENT, SURPRISAL_MAX, paintSurprisal, renderLens, renderScale } from "./lens.js";
import { ModelPicker } from "./models.js";
import { generateRequest, showMode, showSamplingFields } from "./form.js";
import {
  TABLE_MAX_ROWS, canvasCellAt, drawPattern, inlineToken, renderError, renderHeadThumbs, renderHeatmap,
  renderLegend, renderMatrix, tokenLabel, tokenName,
} from "./render.js";
import { streamGenerate } from "./stream.js";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("generate-form"), prompt: $("prompt"), strategy: $("strategy"), temperature: $("temperature"),
  k: $("top-k"), p: $("top-p"), seed: $("seed"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  generate: $("generate"), stop: $("stop"), status: $("status"), error: $("error"), model: $("model"),
  tokens: $("tokens"), layer: $("layer"), head: $("head"), stretch: $("stretch"), legend: $("legend"),
  caption: $("heat-caption"), detail: $("heat-detail"), heatmap: $("heatmap"), matrix: $("matrix"),
  matrixCanvas: $("matrix-canvas"), heads: $("heads"), readout: $("readout"), attention: $("attention"),
  empty: $("empty"), picker: $("model-picker"), examples: $("examples"), examplesWrap: $("examples-wrap"),
  completion: $("completion"), lens: $("lens"), lensCard: $("lens-card"), lensTable: $("lens-table"),
  promptLabel: $("prompt-label"), score: $("score"),
};

let view = new Generation(); // or an Analysis: what the page shows

const state = {
  layer: 0,
  head: "mean", // or a head index
  selected: null, // the selected position
  preview: null, // the position under the pointer, shown instead of the selection
  chosenByUser: false,
  mode: "generate", // or "analyze"
  model: null, // the id of the model chosen in the picker
  headChosen: false, // the user picked a layer or head since the model was chosen
  focused: false, // the selection is the model's attention_focus: keep it while tokens stream
  controller: null, // AbortController of the running generation
  timer: 0, // a pending throttled render
  lastRender: 0,
};

// -- streaming and analyzing -----------------------------------------------------------------------
async function run(event) {
  event.preventDefault();
  if (state.controller) return;
  if (!picker.loaded) await picker.load({ apiKey: ui.apiKey.value }); // refused without the key before
  const analyzing = state.mode === "analyze";
  const request = analyzing
    ? analyzeRequest({ model: picker.current?.id, prompt: ui.prompt.value, completion: ui.completion.value })
    : generateRequest(ui, { model: picker.current?.id });
  reset();
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  try {
    if (analyzing) await analyze(request, controller.signal);
    else await generate(request, controller.signal);
  } catch (err) {
    if (err.name === "AbortError") setStatus(analyzing ? "Stopped." : `Stopped after ${view.tokens.length} tokens.`);
    else showError(err);
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

async function analyze(request, signal) {
  setStatus("Analyzing…");
  const response = await postAnalyze(request, { apiKey: ui.apiKey.value, signal });
  view = new Analysis(response, { prompt: request.completion ? request.prompt : null });
  showModel();
  fillSelectors();
  view.tokens.forEach((_, pos) => addChip(pos));
  state.selected = view.lastPromptPosition;
  applyFocus(view.lastPromptPosition);
  ui.score.hidden = view.completionLogprob == null;
  if (!ui.score.hidden) {
    ui.score.textContent = scoreText(view);
    ui.score.dataset.logprob = String(view.completionLogprob);
  }
  render();
  setStatus(`Analyzed ${response.usage.prompt_tokens} tokens in one forward pass.`);
}

async function generate(request, signal) {
  setStatus("Sending…");
  for await (const e of streamGenerate(request, { apiKey: ui.apiKey.value, signal })) {
    if (e.type === "start") onStart(e);
    else if (e.type === "token") onToken(e);
    else if (e.type === "done") onDone(e);
  }
}

/** For a model whose card names the head its probe found, open on it at the prompt's last token. */
function applyFocus(promptLast) {
  const focus = picker.current?.attention_focus;
  if (!focus || state.headChosen || focus.layer >= view.layers || focus.head >= view.heads) return;
  state.layer = focus.layer;
  state.head = focus.head;
  ui.layer.value = String(focus.layer);
  ui.head.value = String(focus.head);
  if (focus.position === "last") {
    state.selected = promptLast;
    state.focused = true;
  }
}

function showModel() {
  ui.model.textContent = `${view.model} · ${view.layers} layers × ${view.heads} heads`;
}

function onStart(e) {
  view.start(e);
  showModel();
  fillSelectors();
  view.prompt.forEach((_, pos) => addChip(pos));
  state.selected = view.prompt.length - 1;
  applyFocus(view.prompt.length - 1);
  setStatus(`Prompt: ${view.prompt.length} tokens. Generating…`);
  scheduleRender();
}

function onToken(e) {
  const pos = view.add(e);
  addChip(pos, e.text === "" ? " (adds no text)" : "");
  // Show the answer's first token, unless the model's focus (the prompt's last token) is shown.
  if (!state.chosenByUser && !state.focused && e.index === 0) state.selected = pos;
  setStatus(`Generating… ${view.tokens.length} tokens`);
  scheduleRender();
}

function onDone(e) {
  const t = e.timings || {};
  const parts = [`Finished (${e.finish_reason})`,
    `${e.usage.prompt_tokens} prompt + ${e.usage.completion_tokens} generated tokens`];
  if (t.ttft_ms != null) parts.push(`first token ${t.ttft_ms.toFixed(1)} ms`);
  if (t.tokens_per_second) parts.push(`${Math.round(t.tokens_per_second)} tokens/s`);
  render(); // the final state now, not after the streaming throttle
  setStatus(`${parts.join(" · ")}.`);
}

function reset() {
  view = new Generation();
  Object.assign(state, { selected: null, preview: null, chosenByUser: false, focused: false });
  ui.tokens.replaceChildren();
  ui.score.hidden = true;
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
  renderError(ui.error, err);
  ui.error.hidden = false;
  setStatus(view.tokens.length ? `Failed after ${view.tokens.length} tokens.` : "Failed.");
}

// -- rendering -----------------------------------------------------------------------------------
function addChip(pos, note = "") {
  const token = view.tokenAt(pos);
  const chip = document.createElement("button");
  chip.type = "button";
  chip.className = token.generated ? "tok generated" : token.completion ? "tok prompt completion" : "tok prompt";
  chip.dataset.pos = String(pos);
  chip.setAttribute("aria-pressed", "false");
  chip.title = `position ${pos} · id ${token.id} · ${tokenName(token.text)}${note}`;
  if (token.text === "") chip.setAttribute("aria-label", `position ${pos}, token ${token.id} with no text`);
  const index = document.createElement("span");
  index.className = "tok-pos";
  index.textContent = pos;
  chip.append(tokenLabel(token.text), index);
  if (view instanceof Analysis) paintSurprisal(chip, token);
  ui.tokens.append(chip);
}

// While tokens stream in, redraw at most every RENDER_EVERY_MS: a long generation's matrix is
// O(tokens²) to draw, and the chips already show each token the moment it arrives.
const RENDER_EVERY_MS = 200;

function scheduleRender() {
  if (state.timer) return;
  const wait = Math.max(0, state.lastRender + RENDER_EVERY_MS - performance.now());
  state.timer = setTimeout(() => requestAnimationFrame(() => {
    state.timer = 0;
    render();
  }), wait);
}

function scaleMax(rows, layer, head) {
  if (!ui.stretch.checked || !rows) return 1;
  let max = 0;
  const row = view.rowOf(layer, head);
  for (let q = 0; q < rows; q++) for (const w of row(q)) max = Math.max(max, w);
  return max || 1;
}

function render() {
  state.lastRender = performance.now();
  const rows = view.rows;
  ui.attention.hidden = rows === 0;
  ui.empty.hidden = rows !== 0;
  ui.lensCard.hidden = !view.lensRows;
  for (const chip of ui.tokens.children) {
    chip.setAttribute("aria-pressed", String(Number(chip.dataset.pos) === state.selected));
  }
  if (!rows) return;
  const { layer, head } = state;
  const max = scaleMax(rows, layer, head);
  renderLegend(ui.legend, max);
  const tokens = Array.from({ length: view.size }, (_, pos) => view.tokenAt(pos));
  const selectedQuery = state.selected == null ? null : view.queryOf(state.selected);
  const rowOf = view.rowOf(layer, head);
  const asTable = rows <= TABLE_MAX_ROWS;
  ui.matrix.hidden = !asTable;
  ui.matrixCanvas.hidden = asTable;
  if (asTable) {
    renderMatrix(ui.matrix, { tokens, rows, rowOf, layer, head, scaleMax: max, selectedQuery });
  } else {
    ui.matrix.tBodies[0].replaceChildren();
    ui.matrix.tHead?.replaceChildren();
    const size = Math.max(1, Math.floor(640 / rows)) * rows;
    ui.matrixCanvas.width = ui.matrixCanvas.height = size;
    ui.matrixCanvas.style.width = ui.matrixCanvas.style.height = `${size}px`; // drawn by renderSelection
  }
  renderHeadThumbs(ui.heads, { heads: view.heads, chosen: state.head, rows, scaleMax: max,
    rowOf: (head) => view.rowOf(state.layer, head) });
  renderSelection(max);
  if (view.lensRows) renderLens(ui.lensTable, view, { selected: selectedQuery });
}

/** The heatmap and caption for the previewed (hovered) position, else the selected one. */
function renderSelection(max = scaleMax(view.rows, state.layer, state.head)) {
  const pos = state.preview ?? state.selected;
  const q = pos == null || pos >= view.size ? null : view.queryOf(pos);
  for (const tr of ui.matrix.tBodies[0]?.rows || []) {
    tr.classList.toggle("selected", Number(tr.dataset.query) === q);
  }
  if (!ui.matrixCanvas.hidden) {
    drawPattern(ui.matrixCanvas, { rows: view.rows, rowOf: view.rowOf(state.layer, state.head), scaleMax: max,
      selectedQuery: q });
  }
  if (q == null) return;
  const rows = view.headRows(q, state.layer);
  if (!rows) {
    ui.heatmap.replaceChildren();
    return;
  }
  const token = view.tokenAt(pos);
  const keys = Array.from({ length: q + 1 }, (_, k) => view.tokenAt(k));
  renderHeatmap(ui.heatmap, { keys, weights: pickHead(rows, state.head), layer: state.layer, head: state.head,
    query: q, scaleMax: max });
  ui.heatmap.dataset.pos = String(pos);
  ui.caption.replaceChildren(...(token.generated
    ? ["Choosing ", inlineToken(token), ` (position ${pos}): where the query at `, inlineToken(view.tokenAt(q)),
      ` (position ${q}) looked`]
    : ["Where ", inlineToken(token), ` (position ${pos}) looks`]));
  const headName = state.head === "mean" ? `mean of ${view.heads} heads` : `head ${state.head}`;
  const detail = [`layer ${state.layer} · ${headName}`];
  const focus = picker.current?.attention_focus;
  if (focus && focus.layer === state.layer && focus.head === state.head) {
    detail.push(" · the head this model's card names (its attention probe's best)");
  }
  if (token.generated && token.logprob != null) {
    detail.push(` · chosen with p = ${percent(token.logprob)}`);
    const others = (token.top_logprobs || []).filter((t) => t.id !== token.id).slice(0, 3);
    if (others.length) detail.push(" · runners-up:");
    for (const t of others) detail.push(" ", inlineToken(t), ` ${percent(t.logprob)}`);
  }
  ui.detail.replaceChildren(...detail);
}

const percent = (logprob) => `${(100 * Math.exp(logprob)).toFixed(1)}%`;

function fillSelectors() {
  state.layer = Math.max(0, Math.min(state.layer, view.layers - 1));
  ui.layer.replaceChildren(...Array.from({ length: view.layers }, (_, l) => new Option(`layer ${l}`, String(l))));
  ui.layer.value = String(state.layer);
  if (state.head !== "mean" && state.head >= view.heads) state.head = "mean";
  ui.head.replaceChildren(new Option("mean of heads", "mean"),
    ...Array.from({ length: view.heads }, (_, h) => new Option(`head ${h}`, String(h))));
  ui.head.value = String(state.head);
}

// -- interaction ---------------------------------------------------------------------------------
function select(pos, { focus = false } = {}) {
  if (pos == null || pos < 0 || pos >= view.size) return;
  state.selected = pos;
  state.chosenByUser = true;
  state.preview = null;
  render();
  if (focus) ui.tokens.querySelector(`[data-pos="${pos}"]`)?.focus();
}

function setHead(head) {
  state.head = head;
  state.headChosen = true;
  ui.head.value = String(head);
  render();
}

// -- mode and model ------------------------------------------------------------------------------
const promptsByModel = new Map(); // the prompt last typed for each model, restored on switching back

const picker = new ModelPicker({
  select: ui.picker,
  examples: ui.examples,
  onExample(example) {
    ui.prompt.value = example.prompt;
    ui.completion.value = state.mode === "analyze" ? example.completion : "";
    ui.prompt.focus();
  },
  onChange(model) {
    ui.examplesWrap.hidden = !model?.examples?.length;
    if (!model || model.id === state.model) return;
    if (state.model) promptsByModel.set(state.model, ui.prompt.value);
    const first = model.examples?.[0];
    const restored = promptsByModel.get(model.id) ?? first?.prompt;
    if (state.model && restored != null) {
      ui.prompt.value = restored;
      ui.completion.value = "";
    }
    state.model = model.id;
    state.headChosen = false;
    if (!state.controller) reset();
    ui.model.textContent = model.id;
  },
});

ui.form.addEventListener("submit", run);
ui.form.querySelectorAll('input[name="mode"]').forEach((radio) => {
  radio.addEventListener("change", () => {
    state.mode = radio.value;
    showMode(ui, state.mode);
  });
});
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.strategy.addEventListener("change", () => showSamplingFields(ui));
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ui.form.requestSubmit();
});
ui.layer.addEventListener("change", () => {
  state.layer = Number(ui.layer.value);
  state.headChosen = true;
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
  const moves = { ArrowLeft: pos - 1, ArrowRight: pos + 1, Home: 0, End: view.size - 1 };
  if (e.key in moves) {
    e.preventDefault();
    select(moves[e.key], { focus: true });
  }
});
ui.tokens.addEventListener("pointerover", (e) => {
  const chip = e.target.closest(".tok");
  const pos = chip ? Number(chip.dataset.pos) : null;
  if (pos !== state.preview && view.rows) {
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

// A matrix row is a query: clicking it selects the token it chose (generated) or the prompt token.
const selectRow = (q) => select(view.positionOfRow(q));

function readout(q, k) {
  const w = view.rowOf(state.layer, state.head)(q)[k];
  const name = (pos) => tokenName(view.tokenAt(pos).text);
  ui.readout.textContent = `query ${q} ${name(q)} → key ${k} ${name(k)}: ${w}`;
}

ui.matrix.addEventListener("click", (e) => {
  const tr = e.target.closest("tbody tr");
  if (tr) selectRow(Number(tr.dataset.query));
});
ui.matrix.addEventListener("pointerover", (e) => {
  const td = e.target.closest("td[data-weight]");
  if (td) readout(Number(td.dataset.query), Number(td.dataset.key));
});

ui.matrixCanvas.addEventListener("click", (e) => {
  const cell = canvasCellAt(ui.matrixCanvas, view.rows, e);
  if (cell) selectRow(cell.q);
});
ui.matrixCanvas.addEventListener("pointermove", (e) => {
  const cell = canvasCellAt(ui.matrixCanvas, view.rows, e);
  if (cell) readout(cell.q, cell.k);
});

ui.lensTable.addEventListener("click", (e) => {
  const cell = e.target.closest("[data-pos]");
  if (cell) selectRow(Number(cell.dataset.pos));
});

renderScale(document.getElementById("surprisal-legend"), SURPRISAL_GRADIENT, ["0", `${SURPRISAL_MAX / 2}`,
  `${SURPRISAL_MAX}+`]);
renderScale(document.getElementById("lens-legend"), LENS_GRADIENT, ["0", "50%", "100%"]);
showMode(ui, state.mode);
showSamplingFields(ui);
render();
picker.load();
