"""Chat templates, as Jinja applied by the tokenizer's own chat-template machinery.

Assistant turns are wrapped in `{% generation %}` blocks, so the tokenizer's
`return_assistant_tokens_mask` gives exact completion-only loss masks for every
template (not a marker-token scan that only works for one of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).parent / "templates"
KEEP_ORIGINAL = "keep-original"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]

    @property
    def marks_assistant_turns(self) -> bool:
        return "{% generation %}" in self.jinja or "{%- generation %}" in self.jinja


SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chat-ml": ("<|im_start|>", "<|im_end|>"),
    "mistral-with-system": (),
    "poro": ("<|user|>", "<|assistant|>"),
    "simplified-llama31": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


class TemplateError(ValueError):
    pass


def load_template(name: str, tokenizer: Any) -> ChatTemplate:
    if name == KEEP_ORIGINAL:
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            raise TemplateError(
                "data_conf.chat_template_name is keep-original but the tokenizer has no chat template; "
                "choose one of chat-ml, mistral-with-system, poro, simplified-llama31"
            )
        return ChatTemplate(name, jinja if isinstance(jinja, str) else str(jinja), ())
    return ChatTemplate(name, (TEMPLATE_DIR / f"{name}.jinja").read_text(), SPECIAL_TOKENS[name])


def install_template(template: ChatTemplate, tokenizer: Any) -> int:
    """Set the template on the tokenizer and add the special tokens it needs; returns how many were new."""
    missing = [token for token in template.special_tokens if token not in tokenizer.get_vocab()]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    tokenizer.chat_template = template.jinja
    return added
