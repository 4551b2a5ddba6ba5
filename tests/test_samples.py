"""Shipped sample datasets: format, validity, split hygiene, determinism, scoring."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from ondevice_lora.samples import (
    SAMPLE_SPLITS,
    SAMPLE_TASKS,
    exact_match,
    general_text_path,
    load_examples,
    sample_path,
    score,
)
from ondevice_lora.samples import generate

SIZES = {"train": 400, "test": 100}
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTH_NUM = {m: i + 1 for i, m in enumerate(MONTHS)} | {m[:3]: i + 1 for i, m in enumerate(MONTHS)}
ORDINAL_WORD_NUM = {generate.ordinal_word(n): n for n in range(1, 32)}
MON = "|".join(MONTH_NUM)


def split_params():
    return [(t, s) for t in SAMPLE_TASKS for s in SAMPLE_SPLITS]


def user_and_answer(example):
    msgs = example["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    return msgs[0]["content"], msgs[1]["content"]


def dates_in(text: str) -> set[dt.date]:
    """Independently parse every date written in one of the supported forms."""
    found = set()
    for m, d, y in re.findall(rf"\b({MON}) (\d{{1,2}})(?:st|nd|rd|th)?, (\d{{4}})", text):
        found.add(dt.date(int(y), MONTH_NUM[m], int(d)))
    for d, m, y in re.findall(rf"\b(\d{{1,2}}) ({MON}) (\d{{4}})", text):
        found.add(dt.date(int(y), MONTH_NUM[m], int(d)))
    for w, m, y in re.findall(rf"\bthe ([a-z-]+) of ({MON}) (\d{{4}})", text):
        found.add(dt.date(int(y), MONTH_NUM[m], ORDINAL_WORD_NUM[w]))
    for d, m, y in re.findall(rf"\b(\d{{1,2}})-({MON})-(\d{{4}})", text):
        found.add(dt.date(int(y), MONTH_NUM[m], int(d)))
    for m, d, yy in re.findall(rf"\b({MON}) (\d{{1,2}}) '(\d{{2}})", text):
        found.add(dt.date(2000 + int(yy), MONTH_NUM[m], int(d)))
    for a, b, y, region in re.findall(r"\b(\d{2})/(\d{2})/(\d{4}) \((US|UK)\)", text):
        month, day = (a, b) if region == "US" else (b, a)
        found.add(dt.date(int(y), int(month), int(day)))
    for weekday, m, d, y in re.findall(rf"\b([A-Z][a-z]+day), ({MON}) (\d{{1,2}}), (\d{{4}})", text):
        assert WEEKDAYS[dt.date(int(y), MONTH_NUM[m], int(d)).weekday()] == weekday, text
    return found


@pytest.mark.parametrize("task,split", split_params())
def test_split_files_exist_and_parse(task, split):
    path = sample_path(task, split)
    assert path.is_file()
    examples = load_examples(task, split)
    assert len(examples) == SIZES[split]
    for ex in examples:
        user_and_answer(ex)


@pytest.mark.parametrize("split", SAMPLE_SPLITS)
def test_date_answers_are_iso_and_match_the_prompt(split):
    for ex in load_examples("dates", split):
        prompt, answer = user_and_answer(ex)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
        assert dates_in(prompt) == {dt.date.fromisoformat(answer)}, prompt


@pytest.mark.parametrize("split", SAMPLE_SPLITS)
def test_contact_answers_are_exact_json(split):
    for ex in load_examples("contacts", split):
        prompt, answer = user_and_answer(ex)
        data = json.loads(answer)
        assert list(data) == ["name", "city"]
        assert answer == json.dumps(data)
        assert len(data["name"].split()) >= 2
        assert data["name"] in prompt and data["city"] in prompt


@pytest.mark.parametrize("task", SAMPLE_TASKS)
def test_train_and_test_share_no_example(task):
    lines = {s: sample_path(task, s).read_text(encoding="utf-8").splitlines() for s in SAMPLE_SPLITS}
    assert not set(lines["train"]) & set(lines["test"])
    answers = {s: {user_and_answer(json.loads(l))[1] for l in lines[s]} for s in SAMPLE_SPLITS}
    assert not answers["train"] & answers["test"]


def test_test_split_holds_out_unseen_values():
    train = {user_and_answer(ex)[1] for ex in load_examples("contacts", "train")}
    train_cities = {json.loads(a)["city"] for a in train}
    test_cities = {json.loads(user_and_answer(ex)[1])["city"] for ex in load_examples("contacts", "test")}
    assert test_cities - train_cities
    train_years = {a[:4] for a in (user_and_answer(ex)[1] for ex in load_examples("dates", "train"))}
    test_years = {user_and_answer(ex)[1][:4] for ex in load_examples("dates", "test")}
    assert test_years - train_years


def test_generator_is_deterministic_and_matches_shipped_files(tmp_path):
    assert tuple(generate.TASKS) == SAMPLE_TASKS
    written = generate.write_all(tmp_path, seed=0)
    assert len(written) == len(SAMPLE_TASKS) * len(SAMPLE_SPLITS)
    for task in SAMPLE_TASKS:
        for split in SAMPLE_SPLITS:
            fresh = (tmp_path / task / f"{split}.jsonl").read_bytes()
            assert fresh == sample_path(task, split).read_bytes(), (task, split)
    other = generate.write_all(tmp_path / "seed1", seed=1)
    assert other[0].read_bytes() != written[0].read_bytes()


def test_general_text_is_plain_prose():
    text = general_text_path().read_text(encoding="utf-8")
    assert 4000 <= len(text.encode("utf-8")) <= 6500
    assert len(text.split()) > 600


def test_sample_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="dates, contacts"):
        sample_path("nope")
    with pytest.raises(ValueError, match="train, test"):
        sample_path("dates", "validation")


def test_exact_match():
    assert exact_match(["a", " b\n", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)
    assert exact_match(["A"], ["a"]) == 0.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_score_against_references():
    refs = [user_and_answer(ex)[1] for ex in load_examples("dates", "test")]
    assert score("dates", refs) == 1.0
    assert score("dates", [r + "\n" for r in refs]) == 1.0
    assert score("dates", ["2000-01-01 x"] * len(refs)) == 0.0
    with pytest.raises(ValueError):
        score("contacts", refs[:3])
