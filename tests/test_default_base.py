"""The real default base (SmolLM2-135M-Instruct, converted from its Q4_1 GGUF).

Skipped unless pulled (`odlora base pull`); CI pulls it and sets ODLORA_REQUIRE_DEFAULT_BASE=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ondevice_lora.config import SamplingConfig
from ondevice_lora.generate import generate_text
from ondevice_lora.prompts import encode_prompt, render_chat, stop_token_ids

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@torch.no_grad()
def test_logits_match_transformers(default_base):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(default_base.path), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    text = render_chat(default_base.tokenizer, messages, add_generation_prompt=True)
    tokens = torch.tensor([default_base.tokenizer.encode(text, add_special_tokens=False)])
    assert (default_base.model(tokens) - reference(tokens).logits).abs().max().item() <= 1e-4


def test_greedy_answer_names_paris(default_base):
    tokenizer = default_base.tokenizer
    ids = encode_prompt(tokenizer, QUESTION)
    stops = stop_token_ids(tokenizer, default_base.config)
    answer = generate_text(default_base.model, tokenizer, ids, SamplingConfig(max_new_tokens=24), stops)
    assert "Paris" in answer


def test_cli_generate_answers_paris(default_base):
    cmd = [sys.executable, "-m", "ondevice_lora", "generate", "--prompt", QUESTION, "--max-new-tokens", "24"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any("Paris" in line for line in result.stdout.splitlines()), result.stdout
