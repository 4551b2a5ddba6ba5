"""Token sampling (`generate.sample_next`): the distribution it draws from, the top-k and top-p
cuts against a plain full-sort reference, and reproducibility from a seed."""

import numpy as np
import pytest

from ondevice_lora.config import SamplingConfig
from ondevice_lora.generate import TokenChooser, nucleus, sample_next


def reference_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Sort everything, keep each token whose likelier tokens hold less than top_p."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    out = np.zeros_like(probs)
    kept = order[before < top_p]
    out[kept] = probs[kept]
    return out


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 0.99999])
@pytest.mark.parametrize("seed", range(4))
def test_nucleus_keeps_what_a_full_sort_keeps(top_p, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, [0.001, 1, 4, 10][seed], 5000)  # flat to peaked: the nucleus spans 1 to thousands
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    kept = nucleus(probs, top_p)
    got = np.zeros_like(probs)
    got[kept] = probs[kept]
    assert np.array_equal(got, reference_nucleus(probs, top_p))
    assert probs[kept].sum() >= min(top_p, probs.sum()) - 1e-9 and kept.size >= 1


def test_top_token_always_stays():
    assert nucleus(np.array([0.05, 0.9, 0.05]), 0.1).tolist() == [1]


def draws(logits, cfg, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    return np.bincount([sample_next(logits, cfg, rng) for _ in range(n)], minlength=logits.size) / n


def test_sampling_draws_from_the_tempered_softmax():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], dtype=np.float32))
    for temperature in (1.0, 0.5):
        want = np.exp(logits / temperature)
        want /= want.sum()
        got = draws(logits, SamplingConfig(temperature=temperature))
        assert np.abs(got - want).max() < 0.015, (temperature, got, want)


def test_top_k_and_top_p_cut_then_renormalise():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    got = draws(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert got[2:].sum() == 0 and abs(got[0] - 4 / 7) < 0.015
    got = draws(logits, SamplingConfig(temperature=1.0, top_p=0.65))  # 0.4 + 0.3 reach it
    assert got[2:].sum() == 0 and abs(got[0] - 4 / 7) < 0.015


def test_greedy_is_the_argmax_and_a_seed_repeats():
    logits = np.random.default_rng(1).normal(size=300).astype(np.float32)
    assert TokenChooser.for_answer(SamplingConfig()).choose(logits) == int(logits.argmax())
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, seed=7)
    first = [TokenChooser.for_answer(cfg).choose(logits) for _ in range(1)]
    chooser_a, chooser_b = TokenChooser.for_answer(cfg), TokenChooser.for_answer(cfg)
    a = [chooser_a.choose(logits) for _ in range(50)]
    assert a == [chooser_b.choose(logits) for _ in range(50)] and a[:1] == first
    assert len(set(a)) > 1  # it samples
