// Drawing the logit lens and surprisal: the layer × position table (per cell the top token of
// lm_head(final_norm(residual after that layer)) and its probability, the top-k on hover), and
// each token's colour by how surprised the model was to see it (−logprob).
// Every lens cell carries data-layer, data-pos and data-top (the top-k exactly as received, JSON).

import { th, tokenLabel, tokenName } from "./render.js";

// Sequential greens for a lens probability (blue is attention's, amber generated tokens').
const GREENS = [[255, 255, 255], [229, 245, 224], [199, 233, 192], [161, 217, 155], [116, 196, 118],
  [65, 171, 93], [35, 139, 69], [0, 109, 44]];
// Yellow → orange → red ("YlOrRd") for surprisal: hot is surprising.
const HEAT = [[255, 255, 229], [255, 247, 188], [254, 227, 145], [254, 196, 79], [254, 153, 41],
  [236, 112, 20], [204, 76, 2], [140, 45, 4]];

/** Surprisals at or past this many nats get the hottest colour (p ≤ e^-8 ≈ 0.03%). */
export const SURPRISAL_MAX = 8;

function ramp(colours, t) {
  const x = Math.min(1, Math.max(0, t)) * (colours.length - 1);
  const i = Math.min(colours.length - 2, Math.floor(x));
  const f = x - i;
  return `rgb(${colours[i].map((a, j) => Math.round(a + (colours[i + 1][j] - a) * f)).join(", ")})`;
}

export const rampGradient = (colours) => `linear-gradient(to right, ${colours.map((c) => `rgb(${c})`).join(", ")})`;
export const SURPRISAL_GRADIENT = rampGradient(HEAT);
export const LENS_GRADIENT = rampGradient(GREENS);

const percent = (p) => (p >= 0.9995 ? "100%" : p >= 0.1 ? `${(100 * p).toFixed(0)}%` : `${(100 * p).toFixed(1)}%`);

/**
 * Colour a token chip by its surprisal −logprob (nats) and say it in its title; position 0 (no
 * logprob: nothing predicted it) stays plain.
 */
export function paintSurprisal(chip, token) {
  if (token.logprob == null) {
    chip.classList.add("no-surprisal");
    return;
  }
  const surprisal = -token.logprob;
  chip.dataset.logprob = String(token.logprob);
  chip.style.background = ramp(HEAT, surprisal / SURPRISAL_MAX);
  chip.style.borderColor = ramp(HEAT, Math.min(1, surprisal / SURPRISAL_MAX + 0.25));
  chip.title += ` · surprisal ${surprisal.toFixed(2)} nats (p = ${percent(Math.exp(token.logprob))})`;
  const expected = (token.top_logprobs || []).find((t) => t.id !== token.id);
  if (expected && expected.logprob > token.logprob) chip.title += ` · the model preferred ${tokenName(expected.text)}`;
}

/**
 * The lens table: a row per layer (the last is the model's own output), a column per query
 * position, headed by the token at that position and footed by the token that actually came next.
 * `source`: an Analysis or Generation (lensLayers, lensRows, lensAt, tokenAt); `selected`: the
 * query column to outline.
 */
export function renderLens(table, source, { selected = null } = {}) {
  const layers = source.lensLayers;
  const rows = source.lensRows;
  const lens = Array.from({ length: rows }, (_, q) => source.lensAt(q)); // [query][layer index][k]
  const next = (q) => (q + 1 < source.size ? source.tokenAt(q + 1) : null);

  const head = table.createTHead();
  head.replaceChildren();
  const top = head.insertRow();
  top.append(th("position →", "corner"));
  for (let q = 0; q < rows; q++) {
    const label = th("", "col-label", "col");
    label.dataset.pos = String(q);
    label.append(tokenLabel(source.tokenAt(q).text));
    const index = document.createElement("span");
    index.className = "lens-pos";
    index.textContent = q;
    label.append(index);
    label.title = `position ${q} ${tokenName(source.tokenAt(q).text)}: what the model predicts after it`;
    top.append(label);
  }

  const body = table.tBodies[0] || table.createTBody();
  body.replaceChildren();
  layers.forEach((layer, i) => {
    const tr = body.insertRow();
    tr.dataset.layer = String(layer);
    const last = i === layers.length - 1 && layer === source.layers - 1;
    tr.append(th(last ? `layer ${layer} · output` : `layer ${layer}`, "row-label", "row"));
    for (let q = 0; q < rows; q++) {
      const topk = lens[q][i];
      const best = topk[0];
      const td = tr.insertCell();
      td.dataset.layer = String(layer);
      td.dataset.pos = String(q);
      td.dataset.top = JSON.stringify(topk);
      td.style.background = ramp(GREENS, best.prob);
      if (best.prob > 0.6) td.classList.add("dark");
      const actual = next(q);
      if (actual && actual.id === best.id) td.classList.add("hit"); // the lens already names what came
      if (q === selected) td.classList.add("selected");
      const word = document.createElement("span");
      word.className = "lens-tok";
      word.append(tokenLabel(best.text));
      const prob = document.createElement("span");
      prob.className = "lens-prob";
      prob.textContent = percent(best.prob);
      td.append(word, prob);
      td.title = `layer ${layer} at position ${q} ${tokenName(source.tokenAt(q).text)}, top ${topk.length}:\n`
        + topk.map((t) => `${(100 * t.prob).toFixed(2).padStart(6)}%  ${tokenName(t.text)}`).join("\n");
    }
  });

  const foot = table.createTFoot();
  foot.replaceChildren();
  const actual = foot.insertRow();
  actual.append(th("came next", "row-label", "row"));
  for (let q = 0; q < rows; q++) {
    const cell = th("", "next");
    const token = next(q);
    if (token) cell.append(tokenLabel(token.text));
    actual.append(cell);
  }
}

/** A legend: `gradient` from `low` to `high` (the high end may be open, "8+"). */
export function renderScale(el, gradient, ticks) {
  el.querySelector(".legend-bar").style.background = gradient;
  el.querySelector(".legend-ticks").replaceChildren(...ticks.map((t) => {
    const span = document.createElement("span");
    span.textContent = t;
    return span;
  }));
}
