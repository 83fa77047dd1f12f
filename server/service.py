"""What the HTTP routes know of each served model without its weights: the tokenizer, the chat
template, the model's limits and card — and the one place a validated body becomes the engine's request.

    body (Pydantic, validated by FastAPI) → Service.request(body, prompt_ids) → GenerationRequest
                                            (checked by model.limits, as the worker will)

The request is built once, here, and crosses to the worker as it is (server/bridge.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from model.config import ModelConfig
from model.events import AnalysisRequest, AttentionSpec, GenerationRequest, LensSpec
from model.limits import Limits, RequestRefused
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from server.bridge import Bridge, EventStream
from server.chat import ChatTemplate
from server.errors import ApiError
from server.metrics import Metrics
from server.schemas import AnalyzeRequest, ChatCompletionRequest, CompletionRequest, GenerateRequest, ModelCard
from server.settings import Settings

CARD_FILE = "model_card.json"


class Models:
    """Every served model by name; the first is the default."""

    def __init__(self, settings: Settings):
        self.services = {name: Service(name, path, settings) for name, path in settings.models().items()}
        self.default = next(iter(self.services.values()))

    def __iter__(self):
        return iter(self.services.values())

    def get(self, name: str | None) -> Service:
        """The named model (None: the default); 404 `model_not_found` if it is not served."""
        if name is None:
            return self.default
        if (service := self.services.get(name)) is None:
            raise ApiError(404, "model_not_found", f"the model {name!r} is not served here; served: "
                           f"{', '.join(self.services)}", model=name, param="model", code="model_not_found")
        return service


class Service:
    def __init__(self, name: str, checkpoint: Path, settings: Settings):
        self.model_name = name
        self.tokenizer = Tokenizer.from_dir(checkpoint)
        self.config = ModelConfig.load(checkpoint)
        self.limits = Limits.of(self.config, max_context=settings.max_context,
                                max_attention_floats=settings.max_attention_floats)
        self.max_context = self.limits.max_context
        card = checkpoint / CARD_FILE
        self.card = json.loads(card.read_text()) if card.is_file() else {}
        self.metrics = Metrics(name, self.max_context)
        tok = self.tokenizer
        self.chat_template = ChatTemplate(
            tok.chat_template, bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "")

    def request(self, body: GenerateRequest | CompletionRequest | ChatCompletionRequest,
                prompt_ids: list[int], *, prompt_logprobs: int | None = None) -> GenerationRequest:
        """The engine's request for a validated body; ApiError (400) if the model can't run it."""
        attention, lens = body.attention, getattr(body, "logit_lens", None)
        return self._checked(GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=body.max_new_tokens(), sampling=SamplingParams(**body.sampling_params()),
            seed=body.seed, stop=tuple(body.stop), logprobs=body.num_logprobs(), ignore_eos=body.ignore_eos,
            attention=AttentionSpec(**attention.spec_kwargs()) if attention is not None else None,
            lens=LensSpec(**lens.spec_kwargs()) if lens is not None else None, prompt_logprobs=prompt_logprobs))

    def completions(self, body: CompletionRequest) -> list[tuple[str, GenerationRequest | AnalysisRequest]]:
        """(echo text, engine request) for each prompt of a /v1/completions body, in order; ApiError
        (400) naming `prompt[i]` for a token id outside the vocabulary or a prompt past the context.
        Token-id prompts are read as given; string prompts get BOS as everywhere. max_tokens 0 (with
        echo) scores the prompt alone: an AnalysisRequest, nothing generated."""
        out = []
        vocab = self.tokenizer.vocab_size
        for i, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str):
                ids, text = self._completion_ids(prompt), prompt
            else:
                if bad := [t for t in prompt if not 0 <= t < vocab][:5]:
                    name = f"prompt[{i}]" if isinstance(body.prompt[0], list) else "prompt"
                    raise ApiError(400, "invalid_request", f"{name} must be token ids in [0, {vocab}), got {bad}",
                                   param=name)
                ids, text = list(prompt), self.tokenizer.decode(prompt)
            if body.max_tokens == 0:
                if body.attention is not None:
                    raise ApiError(400, "invalid_request", "attention needs max_tokens >= 1 on /v1/completions "
                                   "(use /v1/analyze to look inside a text)", param="attention")
                request = self._checked(AnalysisRequest(ids=ids, logprobs=body.prompt_logprobs_wanted() or 0))
            else:
                request = self.request(body, ids, prompt_logprobs=body.prompt_logprobs_wanted())
            out.append((text, request))
        return out

    def analysis(self, body: AnalyzeRequest) -> AnalysisRequest:
        """The engine's analysis of a validated /v1/analyze body; ApiError (400) if the model can't run it."""
        completion_start = None
        if body.ids is not None:
            ids = body.ids
        elif body.text is not None:
            ids = self.encode(body.text)
        else:
            ids = self.encode(body.prompt + body.completion)
            completion_start = len(self.encode(body.prompt))
            if completion_start >= len(ids):
                raise ApiError(400, "invalid_request", f"the completion {body.completion!r} adds no token after the "
                               f"prompt's {completion_start}", param="completion")
        attention = body.attention
        return self._checked(AnalysisRequest(
            ids=ids, logprobs=body.logprobs, completion_start=completion_start,
            attention=AttentionSpec(**attention.spec_kwargs()) if attention is not None else None,
            lens=LensSpec(**body.logit_lens.spec_kwargs()) if body.logit_lens is not None else None))

    def _completion_ids(self, prompt: str) -> list[int]:
        """A text prompt's ids: BOS, then the text. A text that starts with the BOS token's own text
        (what a harness sends when it decodes token ids that began with BOS) reads it as that BOS."""
        bos = self.chat_template.bos_token
        if bos and prompt.startswith(bos):
            return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt[len(bos):], add_bos=False)]
        return self.encode(prompt)

    def _checked(self, request: GenerationRequest | AnalysisRequest):
        try:
            self.limits.check(request)
        except RequestRefused as e:
            raise ApiError.refused(e) from None
        return request

    async def open(self, bridge: Bridge, request: GenerationRequest | AnalysisRequest) -> EventStream:
        """Hand a request for this model to a worker (see `Bridge.open`)."""
        return await bridge.open(request, model=self.model_name, metrics=self.metrics)

    def model_card(self, weights: dict | None = None) -> ModelCard:
        """This model's entry in /v1/models (`weights`: what the workers loaded it as)."""
        best = self.card.get("metrics", {}).get("attention_probe", {}).get("best_head")
        focus = {"layer": best["layer"], "head": best["head"]} if best else None
        return ModelCard(id=self.model_name, max_context=self.max_context, examples=self.card.get("examples"),
                         attention_focus=focus, weights=weights)

    def prompt_ids(self, body: GenerateRequest | CompletionRequest | ChatCompletionRequest) -> list[int]:
        """The body's prompt as token ids (a chat's messages rendered by the chat template)."""
        if isinstance(body, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            return self.encode(self.chat_template.render(messages), parse_special=self.chat_template.source is not None)
        return self.encode(body.prompt)

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        bos = self.chat_template.bos_token
        starts_with_bos = parse_special and bool(bos) and text.startswith(bos)
        return self.tokenizer.encode(text, add_bos=not starts_with_bos, parse_special=parse_special)
