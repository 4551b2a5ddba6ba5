"""Text generation with the KV cache: prefill once, then one token per step.

`TokenChooser` picks each token: the logits adjusted (presence/frequency penalties, logit bias, a
grammar's mask), then greedy when temperature is 0, otherwise temperature, top-k and top-p
(nucleus) sampling with a seeded generator, so the same seed gives the same text. Generation
stops on an EOS id, a stop string or `max_new_tokens`; `on_text` receives the text as it becomes
final (streaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .config import SamplingConfig
from .errors import OdloraError
from .grammar import GrammarState


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: Optional[np.random.Generator]) -> int:
    """Pick the next token id from logits (vocab,): greedy, or temperature, top-k and top-p.

    In numpy, on one thread: torch would spread each 49k-wide op over its thread pool, which waits
    for the cores an inference session's threads still spin on after a step (about 2 ms an op).
    """
    if cfg.temperature == 0:
        return int(logits.argmax())
    ids = np.arange(logits.size)
    if cfg.top_k and cfg.top_k < logits.size:
        ids = np.argpartition(logits, logits.size - cfg.top_k)[logits.size - cfg.top_k:]
    scaled = logits[ids].astype(np.float64) / cfg.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if cfg.top_p < 1:
        kept = nucleus(probs, cfg.top_p)
        ids, probs = ids[kept], probs[kept]
    cumulative = np.cumsum(probs)
    u = (rng or np.random.default_rng()).random() * cumulative[-1]
    return int(ids[min(np.searchsorted(cumulative, u, side="right"), ids.size - 1)])


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of likeliest `probs` whose mass reaches `top_p` (the top one
    always stays; ties go by index), without sorting the vocabulary (a 49k sort costs ~2 ms).

    Thresholds lo < hi bracket the cut: every token >= hi is in (the likelier tokens hold less than
    top_p), every token < lo out (the tokens >= lo hold top_p). hi starts at the top probability,
    lo halves until it holds the mass; then bisection narrows the band between them until it is
    small (or flat) enough to sort.
    """
    total, hi = probs.sum(), np.nextafter(probs.max(), np.inf)
    lo = hi / 2
    while (held := probs[probs >= lo].sum()) < top_p and held < total:
        hi, lo = lo, lo / 2
    sure = [np.flatnonzero(probs >= hi)]
    sure_mass = probs[sure[0]].sum()
    band = np.flatnonzero((probs >= lo) & (probs < hi))
    while band.size > 256 and probs[band].min() < probs[band].max():
        mid = (lo + hi) / 2
        upper = band[probs[band] >= mid]
        if sure_mass + probs[upper].sum() >= top_p:
            lo, band = mid, upper
        else:
            hi, band = mid, band[probs[band] < mid]
            sure.append(upper)
            sure_mass += probs[upper].sum()
    band = band[np.argsort(-probs[band], kind="stable")]
    before = sure_mass + np.cumsum(probs[band]) - probs[band]  # mass of the likelier tokens
    return np.concatenate((*sure, band[before < top_p]))


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's own distribution (before penalties,
    bias, grammar and temperature: what the model thought), and the `top` most likely tokens'."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # most likely first


class TokenChooser:
    """Picks the tokens of one answer, one at a time, and remembers what it needs to: how often each
    token was said (the penalties), where the answer stands in its grammar, and each token's
    log-probability when `logprobs` (the number of alternatives to keep) is set."""

    def __init__(self, cfg: SamplingConfig, rng: Optional[np.random.Generator] = None,
                 grammar: Optional[GrammarState] = None, logprobs: Optional[int] = None):
        self.cfg, self.rng, self.grammar, self.logprobs = cfg, rng, grammar, logprobs
        self.counts: dict[int, int] = {}
        self.record: list[TokenLogprob] = []

    @classmethod
    def for_answer(cls, cfg: SamplingConfig, tokenizer=None, stop_ids: frozenset = frozenset(),
                   logprobs: Optional[int] = None) -> "TokenChooser":
        """A chooser with its seeded random generator and, when `cfg.grammar` is set, the grammar's state
        (which needs the tokenizer and the end tokens)."""
        cfg.validate()
        rng = np.random.default_rng(cfg.seed) if cfg.seed is not None else None
        grammar = None
        if cfg.grammar is not None:
            if tokenizer is None:
                raise OdloraError("a grammar needs the tokenizer", param="grammar")
            grammar = GrammarState(tokenizer, cfg.grammar, frozenset(stop_ids))
        return cls(cfg, rng, grammar, logprobs)

    def choose(self, logits) -> int:
        """The next token after `logits` (vocab,), a torch tensor or a numpy array."""
        logits = (logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)).reshape(-1)
        logits = logits.astype(np.float32, copy=False)
        token = sample_next(self.adjusted(logits), self.cfg, self.rng)
        if self.logprobs is not None:
            self.record.append(token_logprob(logits, token, self.logprobs))
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.grammar is not None:
            self.grammar.accept(token)
        return token

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        penalised = self.counts and (cfg.presence_penalty or cfg.frequency_penalty)
        if not (penalised or cfg.logit_bias or self.grammar is not None):
            return logits
        values = logits.copy()
        if penalised:  # OpenAI's formula: minus count x frequency, minus presence once if said at all
            ids = np.fromiter(self.counts, dtype=np.int64)
            counts = np.fromiter(self.counts.values(), dtype=np.float32)
            values[ids] -= counts * cfg.frequency_penalty + cfg.presence_penalty
        for token, bias in cfg.logit_bias.items():
            values[token] += bias
        if self.grammar is not None:
            values[~self.grammar.allowed(values.size)] = -np.inf
        return values


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under softmax(logits), and the `top` likeliest tokens'."""
    values = logits.astype(np.float64)
    peak = values.max()
    logprobs = values - (peak + np.log(np.exp(values - peak).sum()))
    best = np.argpartition(-logprobs, top)[:top] if top else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(token, float(logprobs[token]), [(int(t), float(logprobs[t])) for t in best])


@torch.no_grad()
def generate_tokens(model, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: set[int],
                    tokenizer=None) -> Iterator[int]:
    """Yield new token ids (EOS excluded) until EOS or max_new_tokens (`tokenizer`: for a grammar)."""
    chooser = TokenChooser.for_answer(cfg, tokenizer, frozenset(stop_ids))
    n = len(prompt_ids)
    max_len = model.args.max_seq_len
    if n >= max_len:
        raise OdloraError(f"prompt has {n} tokens; the model holds at most {max_len - 1} before generating")
    model.setup_cache(max_batch=1, max_seq_len=min(max_len, n + cfg.max_new_tokens))
    try:
        logits = model(torch.tensor([prompt_ids]), input_pos=torch.arange(n))[0, -1]
        for pos in range(n, min(max_len, n + cfg.max_new_tokens)):
            token = chooser.choose(logits)
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
    for token in generate_tokens(model, prompt_ids, cfg, stop_ids, tokenizer):
        if stream.push(token):
            break
    return stream.close()
