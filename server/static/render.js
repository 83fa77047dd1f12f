// Drawing attention: the colour scale, token labels with visible whitespace, the heatmap of one
// query's row over its keys, the [query × key] matrix, and per-head thumbnails.
// Every coloured cell that stands for a weight carries data-weight (the exact number it shows,
// as received or as averaged here) and data-layer / data-head / data-query / data-key.

// White → deep blue (ColorBrewer "Blues", starting at pure white): sequential and perceptually
// ordered, so a darker cell always means more attention.
const BLUES = [
  [255, 255, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
  [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107],
];
export const GRADIENT = `linear-gradient(to right, ${BLUES.map((c) => `rgb(${c})`).join(", ")})`;

/** [r, g, b] for a weight on the scale 0…max. */
export function weightRGB(weight, max = 1) {
  const t = Math.min(1, Math.max(0, max > 0 ? weight / max : 0)) * (BLUES.length - 1);
  const i = Math.min(BLUES.length - 2, Math.floor(t));
  const f = t - i;
  return BLUES[i].map((a, j) => Math.round(a + (BLUES[i + 1][j] - a) * f));
}

export const weightColor = (weight, max = 1) => `rgb(${weightRGB(weight, max).join(", ")})`;

const inkColor = (weight, max) => (weight > 0.5 * max ? "#ffffff" : "#10213a");

export const formatWeight = (w) => (w >= 0.9995 ? "1.000" : w.toFixed(3));

// ".92" in matrix cells: two digits are what fits; exact values are in the title and data-weight.
const shortWeight = (w) => (w < 0.005 ? "" : w >= 0.995 ? "1" : w.toFixed(2).slice(1));

const VISIBLE = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
const SPECIAL = /^<\|?[^<>\s]+\|?>$/;

/** A token's text with whitespace made visible ("␣five"); "∅" for a token with no text. */
export function tokenLabel(text) {
  const out = document.createElement("span");
  out.className = "tok-text";
  if (text === "") {
    out.append(glyph("∅"));
    out.classList.add("special");
    return out;
  }
  if (SPECIAL.test(text)) out.classList.add("special");
  let plain = "";
  for (const ch of text) {
    if (VISIBLE[ch]) {
      if (plain) out.append(plain);
      plain = "";
      out.append(glyph(VISIBLE[ch]));
    } else {
      plain += ch;
    }
  }
  if (plain) out.append(plain);
  return out;
}

function glyph(ch) {
  const span = document.createElement("span");
  span.className = "ws";
  span.setAttribute("aria-hidden", "true");
  span.textContent = ch;
  return span;
}

/** A readable name for titles and captions: the token's text in quotes, whitespace escaped. */
export const tokenName = (text) => (text === "" ? "(no text)" : JSON.stringify(text));

function weightAttrs(el, weight, { layer, head, query, key }) {
  el.dataset.weight = String(weight);
  el.dataset.layer = String(layer);
  el.dataset.head = String(head);
  el.dataset.query = String(query);
  el.dataset.key = String(key);
}

/**
 * The heatmap of one query row: each key token as a chip coloured by its weight, the value below.
 * `keys`: [{text}] for positions 0..query; `weights`: the row (length query + 1).
 */
export function renderHeatmap(list, { keys, weights, layer, head, query, scaleMax }) {
  list.replaceChildren();
  weights.forEach((w, key) => {
    const item = document.createElement("li");
    item.className = "heat-cell";
    if (key === query) item.classList.add("is-query");
    weightAttrs(item, w, { layer, head, query, key });
    item.title = `key ${key} ${tokenName(keys[key].text)}: ${w}`;
    const chip = document.createElement("span");
    chip.className = "heat-chip";
    chip.style.background = weightColor(w, scaleMax);
    chip.style.color = inkColor(w, scaleMax);
    chip.append(tokenLabel(keys[key].text));
    const value = document.createElement("span");
    value.className = "heat-value";
    value.textContent = formatWeight(w);
    item.append(chip, value);
    list.append(item);
  });
}

/**
 * The [query × key] matrix as a table: a row per query position (labelled by its token, and on the
 * right by the token that position predicts), a column per key; the causal upper triangle is blank.
 * `tokens`: [{text, generated}] for every position; `rowOf(q)`: the weights of query q.
 */
export function renderMatrix(table, { tokens, rows, rowOf, layer, head, scaleMax, selectedQuery }) {
  const cell = Math.max(10, Math.min(36, Math.floor(560 / Math.max(rows, 1))));
  table.style.setProperty("--cell", `${cell}px`);
  table.classList.toggle("show-values", cell >= 30);
  table.classList.toggle("compact", cell < 18);

  const head_ = table.createTHead();
  head_.replaceChildren();
  const top = head_.insertRow();
  top.append(th("", "corner"));
  for (let k = 0; k < rows; k++) {
    const label = th("", tokens[k].generated ? "col-label generated" : "col-label", "col");
    label.append(tokenLabel(tokens[k].text));
    label.title = `key ${k} ${tokenName(tokens[k].text)}`;
    top.append(label);
  }
  top.append(th("predicts", "next-head"));

  const body = table.tBodies[0] || table.createTBody();
  body.replaceChildren();
  for (let q = 0; q < rows; q++) {
    const tr = body.insertRow();
    tr.dataset.query = String(q);
    if (q === selectedQuery) tr.classList.add("selected");
    const label = th("", tokens[q].generated ? "row-label generated" : "row-label", "row");
    label.append(tokenLabel(tokens[q].text));
    tr.append(label);
    const weights = rowOf(q);
    for (let k = 0; k < rows; k++) {
      const td = tr.insertCell();
      if (k > q) {
        td.className = "masked"; // causal: query q never sees key k > q
        continue;
      }
      const w = weights[k];
      weightAttrs(td, w, { layer, head, query: q, key: k });
      td.style.background = weightColor(w, scaleMax);
      td.style.color = inkColor(w, scaleMax);
      td.textContent = shortWeight(w);
    }
    const next = tokens[q + 1];
    const nextCell = th("", next && next.generated ? "next generated" : "next");
    if (next) {
      nextCell.append("→ ", tokenLabel(next.text));
    }
    tr.append(nextCell);
  }
}

export function th(text, className, scope) {
  const el = document.createElement("th");
  el.className = className;
  if (scope) el.scope = scope;
  if (text) el.textContent = text;
  return el;
}

// Past this many rows a table of cells gets slow to build (seconds at 256 rows in Chromium):
// larger patterns are drawn on a canvas, one pixel block per cell.
export const TABLE_MAX_ROWS = 80;

/**
 * A [query × key] pattern on a canvas: the per-head thumbnails, and the matrix itself when it has
 * more than TABLE_MAX_ROWS rows. Above the diagonal stays transparent; `selectedQuery` is outlined.
 */
export function drawPattern(canvas, { rows, rowOf, scaleMax, selectedQuery = null, background = null }) {
  const image = new ImageData(Math.max(rows, 1), Math.max(rows, 1));
  for (let q = 0; q < rows; q++) {
    const weights = rowOf(q);
    for (let k = 0; k <= q; k++) {
      const at = (q * rows + k) * 4;
      image.data.set(weightRGB(weights[k], scaleMax), at);
      image.data[at + 3] = 255;
    }
  }
  const pixels = document.createElement("canvas");
  pixels.width = pixels.height = image.width;
  pixels.getContext("2d").putImageData(image, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (background) {
    ctx.fillStyle = background;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(pixels, 0, 0, canvas.width, canvas.height);
  if (selectedQuery != null && rows) {
    const step = canvas.height / rows;
    ctx.strokeStyle = "#e8590c";
    ctx.lineWidth = 2;
    ctx.strokeRect(0, selectedQuery * step, (selectedQuery + 1) * step, step);
  }
}

/** A token inline in a caption: its label in a small chip (amber when generated). */
export function inlineToken(token) {
  const span = document.createElement("span");
  span.className = token.generated ? "inline-tok generated" : "inline-tok";
  span.append(tokenLabel(token.text));
  return span;
}

/**
 * The per-head thumbnails of one layer ("mean" first), each a button with its pattern drawn;
 * `rowOf(head)`: q → that head's weights; `chosen`: the head shown (pressed).
 */
export function renderHeadThumbs(container, { heads, chosen, rows, rowOf, scaleMax }) {
  const choices = ["mean", ...Array.from({ length: heads }, (_, h) => h)];
  if (container.children.length !== choices.length) {
    container.replaceChildren(...choices.map((head) => {
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
  for (const button of container.children) {
    const head = button.dataset.head === "mean" ? "mean" : Number(button.dataset.head);
    button.setAttribute("aria-pressed", String(head === chosen));
    drawPattern(button.querySelector("canvas"), { rows, rowOf: rowOf(head), scaleMax, background: "#ffffff" });
  }
}

/** The (query, key) under the pointer on a canvas-drawn matrix of `rows`, or null above the diagonal. */
export function canvasCellAt(canvas, rows, e) {
  const rect = canvas.getBoundingClientRect();
  const q = Math.floor(((e.clientY - rect.top) / rect.height) * rows);
  const k = Math.floor(((e.clientX - rect.left) / rect.width) * rows);
  return q >= 0 && q < rows && k >= 0 && k <= q ? { q, k } : null;
}

/** The colour legend: the gradient from 0 to `max` with three ticks. */
export function renderLegend(el, max) {
  el.querySelector(".legend-bar").style.background = GRADIENT;
  const ticks = el.querySelectorAll(".legend-ticks span");
  [0, max / 2, max].forEach((v, i) => {
    ticks[i].textContent = v === 0 ? "0" : v.toFixed(2);
  });
}

/** An error as the server (or the connection) described it: kind, message and any other fields. */
export function renderError(el, err) {
  const title = document.createElement("strong");
  const where = err.fields?.during_stream ? "during the stream" : err.status ? `HTTP ${err.status}` : "";
  title.textContent = `Error${where ? ` (${where})` : ""}: ${err.type || err.name}`;
  const message = document.createElement("p");
  message.className = "error-message";
  message.textContent = err.message;
  el.replaceChildren(title, message);
  const fields = Object.entries(err.fields || {}).filter(([k, v]) => k !== "during_stream" && v != null);
  if (!fields.length) return;
  const list = document.createElement("dl");
  for (const [k, v] of fields) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    list.append(dt, dd);
  }
  el.append(list);
}
