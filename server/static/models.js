// The model picker: every served model from GET /v1/models, its model card's examples as one-click
// buttons, and the head its attention probe found (attention_focus). Switching models only changes
// what the next request names; nothing reloads.

import { errorFromResponse, networkError } from "./stream.js";

/** GET v1/models → [{id, max_context, examples?, attention_focus?}]; throws ApiError. */
export async function fetchModels({ apiKey = "" } = {}) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  let response;
  try {
    response = await fetch("v1/models", { headers });
  } catch (err) {
    throw networkError(err, "could not reach the server");
  }
  if (!response.ok) throw await errorFromResponse(response);
  return (await response.json()).data;
}

export class ModelPicker {
  /**
   * `select`: the <select>; `examples`: the element that holds the example buttons; `onExample`:
   * called with {prompt, completion} when one is clicked; `onChange`: called with the new model.
   */
  constructor({ select, examples, onExample, onChange }) {
    Object.assign(this, { select, examples, onExample, onChange });
    this.models = [];
    select.addEventListener("change", () => {
      this.renderExamples();
      onChange(this.current);
    });
  }

  /** Load the list (again, e.g. with an API key now given); false when the server refused. */
  async load({ apiKey = "" } = {}) {
    try {
      this.models = await fetchModels({ apiKey });
    } catch {
      return false; // a server with an API key refuses until one is typed; generation still works
    }
    const keep = this.select.value;
    this.select.replaceChildren(...this.models.map((m) => new Option(`${m.id} · ${m.max_context} ctx`, m.id)));
    if (this.models.some((m) => m.id === keep)) this.select.value = keep;
    this.select.disabled = this.models.length < 2;
    this.renderExamples();
    this.onChange(this.current);
    return true;
  }

  get loaded() {
    return this.models.length > 0;
  }

  /** The chosen model's entry, or null before the list came (requests then name no model). */
  get current() {
    return this.models.find((m) => m.id === this.select.value) || null;
  }

  renderExamples() {
    const examples = this.current?.examples || [];
    this.examples.replaceChildren(...examples.map((example, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.dataset.example = String(i);
      button.textContent = example.prompt;
      button.title = `${example.prompt} → ${JSON.stringify(example.completion)}`;
      const answer = document.createElement("span");
      answer.className = "example-answer";
      answer.textContent = `→${example.completion}`;
      button.append(answer);
      button.addEventListener("click", () => this.onExample(example));
      return button;
    }));
    this.examples.hidden = examples.length === 0;
  }
}
