"""Data reading, loss masks, truncation, splitting, packing and batching (ondevice_lora/data.py).

    python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ondevice_lora.data import (
    IGNORE,
    Example,
    batches,
    data_stats,
    make_example,
    pack,
    read_examples,
    split_examples,
)
from ondevice_lora.errors import OdloraError
from ondevice_lora.samples import general_text_path, sample_path

REAL_BASE = Path("/tmp/oh/bases/smollm2-135m-instruct")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def loss_text(tokenizer, example: Example) -> str:
    """The decoded tokens that carry loss, in order."""
    return tokenizer.decode([t for t in example.targets if t != IGNORE])


def check_shift(example: Example, seq: list[int]) -> None:
    """input_ids is seq[:-1] and every loss target is the next token of seq."""
    assert example.input_ids == seq[:-1]
    assert len(example.targets) == len(example.input_ids)
    assert all(t == IGNORE or t == seq[i + 1] for i, t in enumerate(example.targets))


# ---------------------------------------------------------------- formats and masks


def test_make_example_shifts_the_mask():
    ex = make_example([10, 11, 12, 13], [True, False, True, True])
    assert ex.input_ids == [10, 11, 12]
    assert ex.targets == [IGNORE, 12, 13]


def test_messages_loss_is_exactly_the_assistant_turns(tmp_path, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, it's fine."},
    ]
    [ex] = read_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), tiny_tokenizer, 256)
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    check_shift(ex, tiny_tokenizer(full, add_special_tokens=False)["input_ids"])
    assert loss_text(tiny_tokenizer, ex) == "Paris.<|im_end|>Rome, it's fine.<|im_end|>"

    # Each loss run, on its own, is one assistant turn + <|im_end|> (no "\n", no user text).
    runs, run = [], []
    for t in ex.targets + [IGNORE]:
        if t == IGNORE and run:
            runs.append(tiny_tokenizer.decode(run))
            run = []
        elif t != IGNORE:
            run.append(t)
    assert runs == ["Paris.<|im_end|>", "Rome, it's fine.<|im_end|>"]


# Templates that break the prefix property: a default system prompt only when the first turn is not
# one (SmolLM2's), content trimmed, and a template that refuses an empty conversation.
ODD_TEMPLATES = [
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe nice.<|im_end|>\n"
    "{% endif %}<|im_start|>{{m['role']}}\n{{m['content']}}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% for m in messages %}<|im_start|>{{m['role']}}\n{{m['content'] | trim}}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if not messages %}{{ raise_exception('no messages') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{m['role']}}\n{{m['content']}}<|im_end|>\n{% endfor %}",
]


@pytest.mark.parametrize("template", ODD_TEMPLATES)
def test_messages_with_other_templates(tmp_path, tiny_tokenizer, template):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    rows = [{"messages": [{"role": "assistant", "content": " Paris. "}, {"role": "user", "content": "Paris?"},
                          {"role": "assistant", "content": "Rome."}]}]
    [ex] = read_examples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 256)
    first = "Paris." if "trim" in template else " Paris. "
    assert loss_text(tokenizer, ex) == f"{first}<|im_end|>Rome.<|im_end|>"


def test_messages_train_on_prompt_covers_everything(tmp_path, tiny_tokenizer):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}]
    [ex] = read_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), tiny_tokenizer, 256,
                         train_on_prompt=True)
    assert IGNORE not in ex.targets
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(ex.input_ids[:1] + ex.targets) == full


def test_prompt_completion_raw_is_the_concatenation(tmp_path, tiny_tokenizer):
    row = {"prompt": "The cat looks at", "completion": " the river."}
    [ex] = read_examples(write_jsonl(tmp_path / "d.jsonl", [row]), tiny_tokenizer, 256, prompt_format="raw")
    seq = tiny_tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tiny_tokenizer.eos_token_id]
    check_shift(ex, seq)
    assert loss_text(tiny_tokenizer, ex) == " the river.<|im_end|>"

    [ex] = read_examples(tmp_path / "d.jsonl", tiny_tokenizer, 256, train_on_prompt=True, prompt_format="raw")
    assert IGNORE not in ex.targets


def test_prompt_completion_trains_as_the_runtime_asks(tmp_path, tiny_tokenizer):
    """By default a prompt/completion row is the user turn and the answer in the chat template:
    what the model reads is exactly what `encode_prompt` (run, serve, chat) feeds it."""
    from ondevice_lora.prompts import encode_prompt

    row = {"prompt": "Convert to 24-hour time: 7:45 pm", "completion": "19:45"}
    [ex] = read_examples(write_jsonl(tmp_path / "d.jsonl", [row]), tiny_tokenizer, 256)
    served = encode_prompt(tiny_tokenizer, row["prompt"], chat=True)
    first_loss = next(i for i, t in enumerate(ex.targets) if t != IGNORE)
    assert ex.input_ids[: first_loss + 1] == served
    assert loss_text(tiny_tokenizer, ex) == "19:45<|im_end|>"
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    [same] = read_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tiny_tokenizer, 256)
    assert (same.input_ids, same.targets) == (ex.input_ids, ex.targets)


def test_raw_format_refuses_messages_and_bases_without_a_template_train_raw(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Berlin."}]}]
    with pytest.raises(OdloraError, match=r"d.jsonl:1: .*prompt_format raw"):
        read_examples(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, 256, prompt_format="raw")
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    row = {"prompt": "Paris is", "completion": " fine."}
    [ex] = read_examples(write_jsonl(tmp_path / "p.jsonl", [row]), plain, 256)  # "chat" resolves to raw
    check_shift(ex, plain(row["prompt"] + row["completion"])["input_ids"] + [plain.eos_token_id])


def test_samples_by_name(tiny_tokenizer):
    train = read_examples("dates", tiny_tokenizer, 256)
    test = read_examples("dates:test", tiny_tokenizer, 256)
    assert train.files == [sample_path("dates", "train")] and test.files == [sample_path("dates", "test")]
    assert train.kinds == {"messages": len(train)}


def test_text_lines_and_mixed_formats(tmp_path, tiny_tokenizer):
    rows = [{"text": "My friend writes 12 apples!"}, "", {"prompt": "Paris is", "completion": " fine."},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Berlin."}]}]
    text_ex, pc_ex, chat_ex = read_examples(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, 256)
    assert IGNORE not in text_ex.targets
    assert text_ex.targets[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(text_ex.input_ids[:1] + text_ex.targets) == "My friend writes 12 apples!<|im_end|>"
    assert loss_text(tiny_tokenizer, pc_ex) == " fine.<|im_end|>"  # the chat template's answer turn
    assert loss_text(tiny_tokenizer, chat_ex) == "Berlin.<|im_end|>"


def test_txt_windows_cover_every_token_once(tmp_path, tiny_tokenizer):
    text = " ".join(f"The cat runs to the river {i}." for i in range(40))
    (tmp_path / "d.txt").write_text(text, encoding="utf-8")
    seq_len = 16
    examples = read_examples(tmp_path / "d.txt", tiny_tokenizer, seq_len)
    ids = tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert all(len(ex.input_ids) == seq_len for ex in examples[:-1])
    assert 0 < len(examples[-1].input_ids) <= seq_len
    assert [t for ex in examples for t in ex.targets] == ids[1:]  # each token a target exactly once
    assert [ex.input_ids[0] for ex in examples] == ids[: len(ids) - 1 : seq_len]


def test_truncation_keeps_the_start_and_drops_lossless(tmp_path, tiny_tokenizer):
    long_user = "The quick brown fox? " * 20
    rows = [{"text": "The model answers the quick brown fox? " * 10},
            {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Yes."}]},
            {"prompt": "A small dog", "completion": " moves."}]
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, 12)
    assert examples.dropped == 1  # the chat example lost its assistant turn
    assert len(examples) == 2
    full = tiny_tokenizer(rows[0]["text"])["input_ids"]
    assert examples[0].input_ids == full[:12]
    assert examples[0].targets == full[1:13]
    assert all(len(ex.input_ids) <= 12 for ex in examples)


def test_directory_reads_sorted_txt_and_jsonl(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "Paris is fine."}])
    (tmp_path / "a.txt").write_text("The cat is fine.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "not read"}])
    examples = read_examples(tmp_path, tiny_tokenizer, 64)
    assert [p.name for p in examples.files] == ["a.txt", "b.jsonl"]
    assert [tiny_tokenizer.decode(ex.input_ids[:1] + ex.targets) for ex in examples] == [
        "The cat is fine.<|im_end|>", "Paris is fine.<|im_end|>"]


def test_shipped_sample_reads(tiny_tokenizer):
    examples = read_examples(sample_path("dates", "train"), tiny_tokenizer, 256)
    assert len(examples) == 400 and examples.dropped == 0
    assert all(loss_text(tiny_tokenizer, ex).endswith("<|im_end|>") for ex in examples)
    assert len(read_examples(general_text_path(), tiny_tokenizer, 256)) > 1


# ---------------------------------------------------------------- errors


def bad_jsonl(tmp_path, line: str, lineno: int = 3) -> Path:
    rows = [{"text": "ok"}, ""] + [{"text": "ok"}] * (lineno - 3) + [line]
    return write_jsonl(tmp_path / "data.jsonl", rows)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"question": "x"}', 'expected "text", "prompt"/"completion", "messages"'),
    ('{"text": "a", "messages": []}', '(found text and messages)'),
    ('{"instruction": "a"}', 'missing "output"'),
    ('{"instruction": "a", "input": 3, "output": "b"}', '"input" must be a string'),
    ('{"conversations": [{"from": "robot", "value": "a"}]}', 'conversations[0].from must be one of'),
    ('{"conversations": []}', '"conversations" must be a non-empty list'),
    ('{"text": 3}', '"text" must be a string'),
    ('{"prompt": "a"}', 'missing "completion"'),
    ('{"prompt": "a", "completion": null}', '"completion" must be a string'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": "hi"}', '"messages" must be a non-empty list'),
    ('{"messages": ["hi"]}', "messages[0] must be an object"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     "messages[1].role must be one of"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}', "messages[0].content must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, tiny_tokenizer, line, message):
    path = bad_jsonl(tmp_path, line, lineno=5)
    with pytest.raises(OdloraError) as e:
        read_examples(path, tiny_tokenizer, 64)
    assert str(e.value).startswith(f"{path}:5: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_messages_without_chat_template(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                         eos_token="<|im_end|>")
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(OdloraError, match=r"d\.jsonl:1: .*chat template"):
        read_examples(path, tokenizer, 64)


def test_chat_template_that_raises(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(OdloraError, match=r"d\.jsonl:2: chat template failed: .*roles must alternate"):
        read_examples(path, tokenizer, 64)


def test_non_utf8_names_line_and_byte(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(OdloraError, match=r"d\.jsonl:2: not valid UTF-8 \(byte offset 28\)"):
        read_examples(path, tiny_tokenizer, 64)
    (tmp_path / "d.txt").write_bytes(b"fine\n\xff")
    with pytest.raises(OdloraError, match=r"d\.txt:2: not valid UTF-8"):
        read_examples(tmp_path / "d.txt", tiny_tokenizer, 64)


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing.jsonl", "no such file or directory"),
    (lambda d: (d / "e.jsonl").write_text("\n  \n") and d / "e.jsonl", "file is empty"),
    (lambda d: (d / "e.txt").write_text("") is not None and d / "e.txt", "file is empty"),
    (lambda d: (d / "x.tsv").write_text("a\tb") and d / "x.tsv", "unsupported file type '.tsv'"),
    (lambda d: (d / "sub").mkdir() or d / "sub", "directory has no data files"),
    (lambda d: (d / "x.json").write_text('{"text": "a"}') and d / "x.json", "expected a JSON array of rows"),
    (lambda d: (d / "x.csv").write_text('text\n"a",b\n') and d / "x.csv", "x.csv:2: more cells than the header"),
    (lambda d: (d / "x.parquet").write_bytes(b"PAR1 not really") and d / "x.parquet", "not a readable Parquet"),
])
def test_file_errors(tmp_path, tiny_tokenizer, setup, message):
    with pytest.raises(OdloraError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_examples(setup(tmp_path), tiny_tokenizer, 64)


def test_dataset_layouts_read_as_their_native_rows(tmp_path, tiny_tokenizer):
    """alpaca and sharegpt rows, in JSON, JSONL, CSV and Parquet, train exactly as the prompt/completion
    and messages rows they stand for."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    native = [{"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"}, {"prompt": "Say hi.", "completion": "Hi!"}]
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hello?"},
                                   {"from": "gpt", "value": "Hello."}]}]
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                              {"role": "assistant", "content": "Hello."}]}]
    want = read_examples(write_jsonl(tmp_path / "native.jsonl", native + messages), tiny_tokenizer, 64)
    (tmp_path / "rows.json").write_text(json.dumps(alpaca + sharegpt))
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        f.write("instruction,input,output\n" + "".join(f'"{r["instruction"]}","{r["input"]}","{r["output"]}"\n'
                                                        for r in alpaca))
    pq.write_table(pyarrow.Table.from_pylist(sharegpt), tmp_path / "rows.parquet")
    layouts = {"json": read_examples(tmp_path / "rows.json", tiny_tokenizer, 64),
               "jsonl": read_examples(write_jsonl(tmp_path / "rows.jsonl", alpaca + sharegpt), tiny_tokenizer, 64),
               "csv + parquet": [*read_examples(tmp_path / "rows.csv", tiny_tokenizer, 64),
                                 *read_examples(tmp_path / "rows.parquet", tiny_tokenizer, 64)]}
    for name, got in layouts.items():
        assert list(got) == list(want), name
    assert layouts["json"].kinds == {"alpaca": 2, "sharegpt": 1}


def test_no_trainable_tokens(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "The quick brown fox? " * 10},
                          {"role": "assistant", "content": "Yes."}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(OdloraError, match="no trainable tokens"):
        read_examples(path, tiny_tokenizer, 8)


# ---------------------------------------------------------------- split, pack, batch, stats


def fake_examples(lengths: list[int]) -> list[Example]:
    """Examples whose tokens encode (example index, position) so misplacement is visible."""
    out = []
    for k, n in enumerate(lengths):
        seq = [1000 * (k + 1) + i for i in range(n + 1)]
        mask = [i % 3 != 1 for i in range(n + 1)]
        out.append(make_example(seq, mask))
    return out


def test_split_is_deterministic_and_sized():
    examples = fake_examples([3] * 20)
    train, val = split_examples(examples, 0.1, seed=7)
    assert (len(train), len(val)) == (18, 2)
    assert split_examples(examples, 0.1, seed=7) == (train, val)
    assert split_examples(examples, 0.1, seed=8)[1] != val
    assert sorted(id(e) for e in train + val) == sorted(id(e) for e in examples)
    assert [len(s) for s in split_examples(examples[:2], 0.01, seed=0)] == [1, 1]
    assert [len(s) for s in split_examples(examples[:1], 0.5, seed=0)] == [1, 0]
    assert [len(s) for s in split_examples(examples[:3], 0.5, seed=0)] == [1, 2]
    assert split_examples(examples, 0.0, seed=0) == (examples, [])
    for bad in (-0.1, 0.6, float("nan")):
        with pytest.raises(OdloraError, match="val_fraction"):
            split_examples(examples, bad, seed=0)


def test_pack_keeps_segments_separate_and_aligned():
    lengths = [5, 9, 3, 16, 7, 2, 11, 4, 1, 6]
    examples = fake_examples(lengths)
    packed = pack(examples, seq_len=16, pad_id=0)
    assert packed.input_ids.shape == packed.targets.shape == packed.segment_ids.shape
    assert packed.input_ids.shape[1] == 16
    assert len(packed) == -(-sum(lengths) // 16)  # FFD reaches the lower bound here
    seen = []
    for ids, tgt, seg in zip(packed.input_ids.tolist(), packed.targets.tolist(), packed.segment_ids.tolist()):
        assert seg == sorted(seg) and seg[0] == 0 and len(set(seg)) == max(seg) + 1  # 0, 1, 2, ...
        for s in sorted(set(seg)):
            pos = [i for i, v in enumerate(seg) if v == s]
            seg_ids, seg_tgt = [ids[i] for i in pos], [tgt[i] for i in pos]
            if seg_ids[0] == 0:  # the padding segment
                assert set(seg_ids) == {0} and set(seg_tgt) == {IGNORE} and s == max(seg)
                continue
            k = seg_ids[0] // 1000 - 1  # which example this segment holds
            assert seg_ids == examples[k].input_ids and seg_tgt == examples[k].targets
            # Targets re-derived within the segment: next input token, the last one from the example.
            assert all(t == IGNORE or t == nxt for t, nxt in zip(seg_tgt, seg_ids[1:] + [seg_ids[-1] + 1]))
            seen.append(k)
    assert sorted(seen) == list(range(len(lengths)))
    assert pack(examples, 16, 0).input_ids.equal(packed.input_ids)  # deterministic
    assert pack([], 16, 0).input_ids.shape == (0, 16)


def test_batches_shuffle_per_epoch_and_keep_last_partial():
    packed = pack(fake_examples([8] * 10), seq_len=8, pad_id=0)
    epoch0 = list(batches(packed, batch_size=4, seed=1, epoch=0))
    assert [b["input_ids"].shape[0] for b in epoch0] == [4, 4, 2]
    assert set(epoch0[0]) == {"input_ids", "targets", "segment_ids"}
    rows = torch.cat([b["input_ids"] for b in epoch0])
    assert sorted(rows[:, 0].tolist()) == sorted(packed.input_ids[:, 0].tolist())
    again = torch.cat([b["input_ids"] for b in batches(packed, 4, seed=1, epoch=0)])
    other = torch.cat([b["input_ids"] for b in batches(packed, 4, seed=1, epoch=1)])
    assert again.equal(rows) and not other.equal(rows)


def test_data_stats(tmp_path, tiny_tokenizer):
    examples = read_examples(sample_path("dates", "train"), tiny_tokenizer, 256)
    packed = pack(examples, 256, tiny_tokenizer.pad_token_id)
    stats = data_stats(examples, packed, files=len(examples.files), dropped=examples.dropped)
    d = stats.to_dict()
    assert d["files"] == 1 and d["examples"] == 400 and d["dropped"] == 0
    assert d["tokens"] == sum(len(e.input_ids) for e in examples) == packed.real_tokens
    assert 0 < d["loss_tokens"] < d["tokens"]
    assert d["packed_rows"] == len(packed)
    assert 0 <= d["padding_fraction"] < 0.1
    assert json.loads(json.dumps(d)) == d


@pytest.mark.skipif(not REAL_BASE.exists(), reason="default base tokenizer not on this machine")
@pytest.mark.parametrize("task", ["dates", "contacts"])
def test_real_tokenizer_masks_sample(task):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REAL_BASE))
    examples = read_examples(sample_path(task, "train"), tokenizer, 256)
    assert len(examples) == 400 and examples.dropped == 0
    answers = [json.loads(line)["messages"][-1]["content"]
               for line in sample_path(task, "train").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [loss_text(tokenizer, ex) for ex in examples] == [a + "<|im_end|>" for a in answers]
