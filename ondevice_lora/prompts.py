"""Turn user text or chat messages into token ids with the base's own tokenizer and template.

An adapter is asked the way it was trained: its *prompt format* is recorded when it is trained
(`odlora.json`), copied into the packed blob's sidecar and the bundle, and applied by every runtime.

* ``chat``: the user's text inside the base's chat template (one user turn, then the assistant's
  generation prompt); training renders {"prompt", "completion"} rows as that user turn and the
  assistant's answer. The default wherever the base has a template.
* ``raw``: the text as it is; training learns ``prompt + completion`` concatenated (TRL's plain
  format). `--format raw`, and what a base without a chat template always gets.
"""

from __future__ import annotations

from typing import Optional

from .errors import OdloraError

PROMPT_FORMATS = ("chat", "raw")
DEFAULT_PROMPT_FORMAT = "chat"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def resolve_prompt_format(requested: str, tokenizer) -> str:
    """The format an adapter trained on this base with `requested` really gets: "chat" needs a
    template, so a base without one trains (and serves) raw."""
    if requested not in PROMPT_FORMATS:
        raise OdloraError(f"{requested!r} is not one of {', '.join(PROMPT_FORMATS)}", param="prompt_format")
    return requested if has_chat_template(tokenizer) else "raw"


def format_mismatch(adapter_name: str, trained: str, asked: str) -> Optional[str]:
    """One line saying that an adapter is asked otherwise than it was trained, or None."""
    if trained == asked:
        return None
    how = {"chat": "through the chat template", "raw": "on raw text (--format raw)"}
    return (f"adapter {adapter_name} was trained {how[trained]} but is asked {how[asked]}; its answers may be "
            f"wrong (leave out --chat/--no-chat to ask it as it was trained)")


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for `prompt`, wrapped in the chat template when `chat` and the base has one."""
    if chat and has_chat_template(tokenizer):
        text = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def stop_token_ids(tokenizer, config: dict) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the config's (int or list)."""
    ids = set()
    for value in (tokenizer.eos_token_id, config.get("eos_token_id")):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
