// The controls form: the /v1/generate request its fields describe, and which fields show for the
// chosen mode (Generate or Analyze) and sampling strategy. `ui`: the page's elements by name.

const P_DEFAULTS = { top_p: 0.9, min_p: 0.05, typical: 0.9 };

/** The streamed generation the form asks for: every layer's and head's attention, logprobs 5. */
export function generateRequest(ui, { model = null } = {}) {
  const strategy = ui.strategy.value;
  const sampling = { strategy };
  if (strategy !== "greedy") sampling.temperature = Number(ui.temperature.value);
  if (strategy === "top_k") sampling.k = Number(ui.k.value);
  if (strategy in P_DEFAULTS) sampling.p = Number(ui.p.value);
  const request = {
    ...(model ? { model } : {}),
    prompt: ui.prompt.value,
    max_tokens: Number(ui.maxTokens.value),
    sampling,
    logprobs: 5,
    attention: { layers: "all", heads: "all", include_prompt: true },
  };
  if (ui.seed.value.trim() !== "") request.seed = Number(ui.seed.value);
  if (ui.lens.checked) request.logit_lens = { layers: "all", top_k: 5, include_prompt: true };
  return request;
}

export function showSamplingFields(ui) {
  const strategy = ui.strategy.value;
  document.querySelectorAll("[data-for]").forEach((el) => {
    el.hidden = !el.dataset.for.split(" ").includes(strategy);
  });
  // The exact ranges ((0, 1] for top_p and typical, [0, 1) for min_p) are the server's to enforce.
  if (strategy in P_DEFAULTS) ui.p.value = P_DEFAULTS[strategy];
}

/** Show the fields of `mode` ("generate" or "analyze"; elements marked data-mode) and name the button. */
export function showMode(ui, mode) {
  document.querySelectorAll("[data-mode]").forEach((el) => {
    el.hidden = el.dataset.mode !== mode;
  });
  ui.generate.textContent = mode === "analyze" ? "Analyze" : "Generate";
  ui.promptLabel.textContent = mode === "analyze" ? "Text (or the prompt, with a completion below)" : "Prompt";
}
