"""Text generation with the KV cache: prefill once, then one token per step.

Greedy when temperature is 0; otherwise temperature, top-k and top-p (nucleus) sampling with a
seeded generator, so the same seed gives the same text. Stops on an EOS id, a stop string or
`max_new_tokens`; `on_text` receives the text as it becomes final (streaming).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from .config import SamplingConfig
from .errors import OdloraError


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


class TextStream:
    """Decode a growing list of token ids into text as generation goes: cut at the first stop
    string, and pass `on_text` only text that is final (not a possible start of a stop string,
    not half a UTF-8 character)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str],
                 on_text: Optional[Callable[[str], None]] = None):
        self.decode, self.stops, self.on_text = decode, stops, on_text
        self.tokens: list[int] = []
        self.text, self.emitted = "", 0

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has ended the text."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hits = [self.text.index(s) for s in self.stops if s in self.text]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        self._emit(len(self.text) - self._held_back())
        return False

    def close(self) -> str:
        self._emit(len(self.text))
        return self.text

    def _held_back(self) -> int:
        if self.text.endswith("\ufffd"):
            return 1
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def _emit(self, upto: int) -> None:
        if self.on_text and upto > self.emitted:
            self.on_text(self.text[self.emitted: upto])
            self.emitted = upto


def generate_text(model, tokenizer, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: set[int],
                  on_text: Optional[Callable[[str], None]] = None) -> str:
    """Generate and decode; stream final text pieces to `on_text`; cut at the first stop string."""
    stream = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), cfg.stop, on_text)
    for token in generate_tokens(model, prompt_ids, cfg, stop_ids):
        if stream.push(token):
            break
    return stream.close()
