"""Chat messages → one prompt string.

A checkpoint's own chat template (tokenizer_config.json `chat_template`, Jinja as in HF) is used
when it has one, rendered in a sandbox. Otherwise the plain template:

    system: You add numbers.
    user: two plus three
    assistant:

one "role: content" line per message, then "assistant:" for the model to continue.
"""

from __future__ import annotations

from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplate:
    def __init__(self, template: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = template
        self._compiled = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._compiled = env.from_string(template)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._compiled is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._compiled.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_token, eos_token=self.eos_token)
