"""Exact-match scoring: generation stops at the first token that rules a match out, and the
score is the one a full generation gives."""

import pytest
import torch

from ondevice_lora.base import load_base
from ondevice_lora.evaluate import chat_prompt_and_answer, could_still_match, task_accuracy
from ondevice_lora.config import SamplingConfig
from ondevice_lora.generate import generate_text


@pytest.mark.parametrize("text, reference, expected", [
    ("", "2024-01-02", True),
    ("  2024-0", "2024-01-02", True),
    ("2024-01-02", " 2024-01-02 ", True),
    ("2024-01-02 \n", "2024-01-02", True),  # trailing space strips away
    ("2024-01-02\ufffd", "2024-01-02", True),  # half a character: could still be a space
    ("2024-01-03", "2024-01-02", False),
    ("2024-01-02.", "2024-01-02", False),
    ("2024-01-02 x", "2024-01-02", False),
    ("The date", "2024-01-02", False),
])
def test_could_still_match(text, reference, expected):
    assert could_still_match(text, reference) is expected


def test_task_accuracy_scores_what_full_generation_scores(tiny_llama_dir):
    """On a random tiny model: references set to its own full greedy answers score 1, altered
    ones 0; the predictions of the misses are cut short, the hits whole."""
    torch.manual_seed(0)
    base = load_base(str(tiny_llama_dir))
    stops = {base.tokenizer.eos_token_id}
    cfg = SamplingConfig(max_new_tokens=12)
    examples = []
    for question in ["The cat is", "Paris was", "My friend looks at", "The meeting moves"]:
        example = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
        prompt, _ = chat_prompt_and_answer(base.tokenizer, example)
        answer = generate_text(base.model, base.tokenizer, prompt, cfg, stops)
        assert answer.strip(), "a random tiny model answers something"
        examples.append((example, answer))
    # Half keep the model's own answer; half get one with a different first character.
    for i, (example, answer) in enumerate(examples):
        example["messages"][1]["content"] = answer if i % 2 == 0 else "#" + answer
    result = task_accuracy(base.model, base.tokenizer, [e for e, _ in examples], stops, max_new_tokens=12)
    assert result["exact_match"] == 0.5
    for i, ((_, answer), prediction) in enumerate(zip(examples, result["predictions"])):
        if i % 2 == 0:
            assert prediction == answer
        else:
            assert answer.startswith(prediction) and len(prediction) < len(answer)
