"""Text generation with the KV cache: prefill once, then one token per step.

Greedy when temperature is 0; otherwise temperature, top-k and top-p (nucleus) sampling with a
seeded generator, so the same seed gives the same text. Stops on an EOS id, a stop string or
`max_new_tokens`; `on_text` receives the text as it becomes final (streaming).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .errors import OdloraError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)

    def validate(self):
        if self.max_new_tokens < 1:
            raise OdloraError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise OdloraError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OdloraError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OdloraError(f"--top-k must be >= 0, got {self.top_k}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator]) -> int:
    """Pick the next token id from logits (vocab,)."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= cfg.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_tokens(model, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: set[int]) -> Iterator[int]:
    """Yield new token ids (EOS excluded) until EOS or max_new_tokens."""
    cfg.validate()
    n = len(prompt_ids)
    max_len = model.args.max_seq_len
    if n >= max_len:
        raise OdloraError(f"prompt has {n} tokens; the model holds at most {max_len - 1} before generating")
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    model.setup_cache(max_batch=1, max_seq_len=min(max_len, n + cfg.max_new_tokens))
    try:
        logits = model(torch.tensor([prompt_ids]), input_pos=torch.arange(n))[0, -1]
        for pos in range(n, min(max_len, n + cfg.max_new_tokens)):
            token = sample_next(logits, cfg, generator)
            if token in stop_ids:
                return
            yield token
            if pos + 1 < model.cache_len:
                logits = model(torch.tensor([[token]]), input_pos=torch.tensor([pos]))[0, -1]
    finally:
        model.drop_cache()


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still grow into a stop string (or are a partial UTF-8 char)."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def generate_text(model, tokenizer, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: set[int],
                  on_text: Optional[Callable[[str], None]] = None) -> str:
    """Generate and decode; stream final text pieces to `on_text`; cut at the first stop string."""
    tokens: list[int] = []
    emitted = 0
    text = ""
    for token in generate_tokens(model, prompt_ids, cfg, stop_ids):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.index(s) for s in cfg.stop if s in text]
        if hits:
            text = text[: min(hits)]
            break
        safe = len(text) - _held_back(text, cfg.stop)
        if on_text and safe > emitted:
            on_text(text[emitted:safe])
            emitted = safe
    if on_text and len(text) > emitted:
        on_text(text[emitted:])
    return text
