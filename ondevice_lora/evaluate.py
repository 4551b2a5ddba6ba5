"""Held-out measures: token loss / perplexity on packed data, and exact-match task accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SamplingConfig
from .generate import generate_tokens
from .prompts import render_chat


def token_loss(model, input_ids, targets, segment_ids) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the positions that have a target, and how many there are.

    Only those positions go through the LM head: with completion-only loss that skips most of
    the (vocab x dim) matmul, the largest single layer of a small model.
    """
    hidden = model.hidden_states(input_ids, segment_ids=segment_ids)
    keep = targets != -100
    logits = model.lm_head(hidden[keep]).float()
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


@torch.no_grad()
def evaluate_loss(model, packed, batch_size: int = 8) -> dict:
    """{"loss", "perplexity", "tokens"} over all rows of `packed`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, packed.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        loss, n = token_loss(model, packed.input_ids[rows], packed.targets[rows], packed.segment_ids[rows])
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def chat_prompt_and_answer(tokenizer, example: dict) -> tuple[list[int], str]:
    """Split a {"messages": [...]} example into the prompt ids (up to the last assistant turn)
    and that turn's reference text."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = render_chat(tokenizer, messages[:last], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False), messages[last]["content"]


def could_still_match(text: str, reference: str) -> bool:
    """Whether more generated text could still make `text.strip() == reference.strip()`."""
    text = text.rstrip("\ufffd").lstrip()  # a trailing U+FFFD is half a UTF-8 character so far
    reference = reference.strip()
    return reference.startswith(text) or (text.startswith(reference) and not text[len(reference):].strip())


def greedy_answer(model, tokenizer, prompt: list[int], reference: str, cfg: SamplingConfig,
                  stop_ids: set[int]) -> str:
    """The greedy answer to `prompt`, cut at the first token that rules out an exact match with
    `reference`: a miss is plain from its first wrong token, and a base that rambles for all of
    `max_new_tokens` cost most of the evaluation's time (129 s of the default base's 40 dates)."""
    tokens: list[int] = []
    text = ""
    stream = generate_tokens(model, prompt, cfg, stop_ids)
    try:
        for token in stream:
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if not could_still_match(text, reference):
                break
    finally:
        stream.close()  # drops the KV cache now, not when the generator is collected
    return text


@torch.no_grad()
def task_accuracy(model, tokenizer, examples: list[dict], stop_ids: set[int], max_new_tokens: int = 32) -> dict:
    """Greedy-generate each example's last assistant turn; exact match after stripping spaces.
    "predictions" holds each answer up to where it stopped being able to match (all of a hit)."""
    was_training = model.training
    model.eval()
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    hits, predictions = 0, []
    for example in examples:
        prompt, reference = chat_prompt_and_answer(tokenizer, example)
        prediction = greedy_answer(model, tokenizer, prompt, reference, cfg, stop_ids)
        predictions.append(prediction)
        hits += prediction.strip() == reference.strip()
    model.train(was_training)
    return {"exact_match": hits / max(len(examples), 1), "examples": len(examples), "predictions": predictions}
