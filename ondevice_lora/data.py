"""User data for `odlora personalize`: read, tokenise, mask, split, pack and batch.

    examples = read_examples(Path("data.jsonl"), tokenizer, seq_len=256)
    train, val = split_examples(examples, val_fraction=0.1, seed=0)
    packed = pack(train, seq_len=256, pad_id=tokenizer.pad_token_id)
    for batch in batches(packed, batch_size=4, seed=0, epoch=0):
        model(batch["input_ids"], segment_ids=batch["segment_ids"])  # loss vs batch["targets"]

Accepted files (a directory means every data file directly inside it, sorted; only regular
files, no symlinks inside a directory, at most 64 MiB in all; see ``_data_files``):

* ``.txt``: raw text, loss on every token, cut into windows of ``seq_len + 1`` tokens;
* rows: ``.jsonl`` (one object per line), ``.json`` (an array of objects, as alpaca_data.json
  is), ``.csv`` (a header row names the fields) and ``.parquet`` (with pyarrow: the `data`
  extra), the layouts of Hugging Face datasets. A row's fields, formats mixed freely:
  ``{"text": ...}`` (loss on all tokens + EOS),
  ``{"prompt": ..., "completion": ...}`` (by default one user turn and the assistant's answer
  through the base's chat template, as the runtimes will ask it; with ``prompt_format="raw"``
  the plain concatenation TRL uses; loss on the completion and what ends it),
  ``{"messages": [{"role", "content"}, ...]}`` (the base's chat template; loss on assistant
  turns and the end-of-turn token the template puts after each);
  alpaca's ``{"instruction", "input", "output"}`` (a prompt/completion row: the instruction, a
  blank line and the input when there is one) and sharegpt's ``{"conversations": [{"from":
  "system"|"human"|"gpt", "value"}, ...]}`` (messages).

A shipped sample can be named instead of a path: ``dates`` (its train split) or ``dates:test``.

Targets are shifted here, not in the loss: ``targets[t]`` is the token to predict at position
``t`` or -100. A packed row can then hold many examples and never predicts across them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from .bounds import VAL_SPLIT
from .errors import OdloraError, named
from .prompts import has_chat_template, render_chat, resolve_prompt_format
from .samples import SAMPLE_SPLITS, SAMPLE_TASKS, sample_path
from .user_files import check_regular, mib, read_regular_file, stat_path

IGNORE = -100  # target value that carries no loss (PyTorch's cross_entropy ignore_index)
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# All data of one run, as read into memory and tokenised at once: 64 MiB of text is some 15M
# tokens, far more than personalisation needs (the shipped samples are 60-90 KiB).
MAX_DATA_BYTES = 64 * 2**20
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training sequence, pre-shifted: ``targets[t]`` is what position ``t`` predicts."""

    input_ids: list[int]
    targets: list[int]


class Examples(list):
    """``read_examples``'s result: a list of Example that also knows where it came from."""

    def __init__(self, files: list[Path]):
        super().__init__()
        self.files = files  # the files read
        self.dropped = 0  # examples with no loss token left after masking and truncation
        self.kinds: Counter = Counter()  # examples per row format: "text", "prompt/completion", "alpaca", ...


@dataclass(frozen=True)
class Encoding:
    """How rows become tokens: where the loss goes and how prompts are rendered."""

    train_on_prompt: bool = False
    prompt_format: str = "chat"  # "chat" or "raw" (see prompts.py); personalize resolves it per base


def make_example(seq: list[int], mask: list[bool]) -> Example:
    """Shift a token sequence and its per-token loss mask into (input_ids, targets)."""
    targets = [tok if keep else IGNORE for tok, keep in zip(seq[1:], mask[1:])]
    return Example(input_ids=seq[:-1], targets=targets)


# ---------------------------------------------------------------- reading files


def read_examples(path: Path, tokenizer, seq_len: int, train_on_prompt: bool = False,
                  prompt_format: str = "chat") -> Examples:
    """Every example in a file, directory or named sample, truncated to ``seq_len`` tokens (start kept).

    Raises OdloraError (one line, with file and line) for anything wrong with the data,
    including when no example has a token to learn from.
    """
    if seq_len < 1:
        raise OdloraError(f"seq_len must be at least 1, got {seq_len}")
    path = resolve_data_path(path)
    encoding = Encoding(train_on_prompt, resolve_prompt_format(prompt_format, tokenizer))
    examples = Examples(_data_files(path))
    for file in examples.files:
        reader = _read_txt if file.suffix == ".txt" else _read_rows
        for kind, seq, mask in reader(file, tokenizer, seq_len, encoding):
            examples.kinds[kind] += 1
            example = make_example(seq[: seq_len + 1], mask[: seq_len + 1])
            if any(t != IGNORE for t in example.targets):
                examples.append(example)
            else:
                examples.dropped += 1
    if not examples:
        raise OdloraError(
            f"{path}: no trainable tokens ({examples.dropped} examples, none with a loss token "
            f"left after masking and truncation to {seq_len} tokens)"
        )
    return examples


def resolve_data_path(spec) -> Path:
    """A path as given, or a shipped sample named `task` or `task:split` when no such path exists."""
    path = Path(spec)
    task, _, split = str(spec).partition(":")
    if not path.exists() and task in SAMPLE_TASKS and split in ("", *SAMPLE_SPLITS):
        return sample_path(task, split or "train")
    return path


def _data_files(path: Path) -> list[Path]:
    """The files behind ``path``: itself, or the *.txt / *.jsonl directly inside a directory.

    Only regular files (user_files.py: a FIFO would hang, a device never ends). ``path`` itself
    may be a symlink, since the user named it; a symlink *inside* a data directory is refused, never
    followed: it could lead out of the directory (to /etc/passwd, say) without the user seeing it.
    Together the files hold at most MAX_DATA_BYTES.
    """
    st = stat_path(path)
    if not stat.S_ISDIR(st.st_mode):
        check_regular(path, st, MAX_DATA_BYTES)
        if path.suffix not in SUFFIXES:
            raise OdloraError(f"{path}: unsupported file type {path.suffix!r}; expected {', '.join(SUFFIXES)}")
        return [path]
    try:
        entries = sorted((e for e in os.scandir(path) if Path(e.name).suffix in SUFFIXES), key=lambda e: e.name)
    except OSError as e:
        raise OdloraError(f"{path}: cannot list the directory ({e.strerror or e})") from None
    files, total = [], 0
    for entry in entries:
        file, st = path / entry.name, stat_path(path / entry.name, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise OdloraError(f"{file}: a symlink inside a data directory is not followed; "
                              f"copy the file in, or give it as the data itself")
        if stat.S_ISDIR(st.st_mode):
            continue  # only the files directly inside
        check_regular(file, st, MAX_DATA_BYTES)
        files.append(file)
        total += st.st_size
    if not files:
        raise OdloraError(f"{path}: directory has no data files ({', '.join(SUFFIXES)})")
    if total > MAX_DATA_BYTES:
        raise OdloraError(f"{path}: its data files hold {mib(total)}, over the limit of {mib(MAX_DATA_BYTES)}")
    return files


def _read_text(file: Path) -> str:
    """The file decoded as UTF-8 (a BOM is allowed); errors name the line and byte offset."""
    data = read_regular_file(file, MAX_DATA_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise OdloraError(f"{file}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    if not text.strip():
        raise OdloraError(f"{file}: file is empty")
    return text


def _read_txt(file: Path, tokenizer, seq_len: int, encoding: Encoding):
    """Raw text: windows of seq_len + 1 tokens that overlap by one, so every token is a target once."""
    ids = _with_eos(tokenizer, tokenizer(_read_text(file))["input_ids"])
    for start in range(0, max(len(ids) - 1, 1), seq_len):
        window = ids[start : start + seq_len + 1]
        yield "text", window, [True] * len(window)


def _read_rows(file: Path, tokenizer, seq_len: int, encoding: Encoding):
    """One (kind, tokens, mask) per row of a .jsonl, .json, .csv or .parquet file."""
    rows = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[file.suffix]
    for where, obj in rows(file):
        yield _encode_object(where, obj, tokenizer, encoding)


def _jsonl_rows(file: Path):
    """(where, object) per non-blank line. Split on "\n" only: JSON strings may hold U+2028."""
    for lineno, line in enumerate(_read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise OdloraError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_rows(file: Path):
    """(where, object) per item of a JSON array (where: its index)."""
    try:
        rows = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise OdloraError(f"{file}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise OdloraError(f"{file}: expected a JSON array of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{file}[{index}]", row


def _csv_rows(file: Path):
    """(where, row) per CSV record after the header (where: its line); empty cells are absent."""
    reader = csv.DictReader(io.StringIO(_read_text(file), newline=""))
    try:
        for row in reader:
            if None in row:
                raise OdloraError(f"{file}:{reader.line_num}: more cells than the header has names")
            yield f"{file}:{reader.line_num}", {key: value for key, value in row.items() if value != ""}
    except csv.Error as e:
        raise OdloraError(f"{file}:{reader.line_num}: not CSV ({e})") from None


def _parquet_rows(file: Path):
    """(where, row) per row of a Parquet file (where: its index), read by pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OdloraError(f"{file}: reading Parquet needs pyarrow: pip install 'ondevice-lora[data]'") from None
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise OdloraError(f"{file}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for index, row in enumerate(rows):
        yield f"{file}[{index}]", row


# ---------------------------------------------------------------- one row


ROW_FORMATS = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",),
               "alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}


def _encode_object(where: str, obj, tokenizer, encoding: Encoding):
    """(kind, tokens, loss mask) for one row, whichever of the formats it is."""
    if not isinstance(obj, dict):
        raise OdloraError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kinds = [kind for kind, keys in ROW_FORMATS.items() if any(key in obj for key in keys)]
    if len(kinds) != 1:
        found = f" (found {' and '.join(kinds)})" if kinds else ""
        raise OdloraError(f'{where}: expected "text", "prompt"/"completion", "messages", alpaca\'s '
                          f'"instruction"/"output" or sharegpt\'s "conversations"{found}')
    kind, on_prompt = kinds[0], encoding.train_on_prompt
    if kind in ("alpaca", "sharegpt"):
        native = _from_alpaca(where, obj) if kind == "alpaca" else _from_sharegpt(where, obj)
        return (kind, *_encode_object(where, native, tokenizer, encoding)[1:])
    if kind == "text":
        return (kind, *_encode_plain(tokenizer, _string(where, obj, "text"), loss_from=0))
    if kind == "prompt/completion":
        prompt, completion = _string(where, obj, "prompt"), _string(where, obj, "completion")
        if encoding.prompt_format == "chat":  # as the runtimes will ask it
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return (kind, *_encode_messages(where, turns, tokenizer, on_prompt))
        return (kind, *_encode_plain(tokenizer, prompt + completion, loss_from=0 if on_prompt else len(prompt)))
    if encoding.prompt_format == "raw" and has_chat_template(tokenizer):
        raw = f"{named('prompt_format')} raw"
        raise OdloraError(f'{where}: "messages" rows train through the chat template, which {raw} '
                          f'leaves out; use "prompt"/"completion" rows or drop {raw}')
    return (kind, *_encode_messages(where, obj["messages"], tokenizer, on_prompt))


def _from_alpaca(where: str, obj: dict) -> dict:
    """alpaca's row as a prompt/completion row: the instruction, then a blank line and the input."""
    instruction, output = _string(where, obj, "instruction"), _string(where, obj, "output")
    extra = _string(where, obj, "input") if obj.get("input") is not None else ""
    return {"prompt": f"{instruction}\n\n{extra}" if extra.strip() else instruction, "completion": output}


def _from_sharegpt(where: str, obj: dict) -> dict:
    """sharegpt's conversation as messages: human -> user, gpt -> assistant."""
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise OdloraError(f'{where}: "conversations" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            allowed = ", ".join(f'"{r}"' for r in SHAREGPT_ROLES)
            raise OdloraError(f"{where}: conversations[{i}].from must be one of {allowed}, got {speaker!r}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return {"messages": messages}


def _string(where: str, obj: dict, key: str) -> str:
    if key not in obj:
        raise OdloraError(f'{where}: missing "{key}"')
    if not isinstance(obj[key], str):
        raise OdloraError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
    return obj[key]


def _encode_plain(tokenizer, text: str, loss_from: int):
    """Text plus EOS, loss on the characters from ``loss_from`` on and on the EOS."""
    ids, mask = _tokenize_spans(tokenizer, text, [(loss_from, len(text))], add_special_tokens=True)
    eos = _with_eos(tokenizer, ids)[len(ids) :]
    return ids + eos, mask + [True] * len(eos)


def _encode_messages(where: str, messages, tokenizer, train_on_prompt: bool):
    """A conversation through the chat template, loss on the assistant spans (or on all)."""
    _check_messages(where, messages)
    if not has_chat_template(tokenizer):
        raise OdloraError(f'{where}: "messages" needs a base with a chat template and this one has '
                          f'none; use "text" or "prompt"/"completion" instead')
    try:
        full = render_chat(tokenizer, messages, add_generation_prompt=False)
        spans = [(0, len(full))] if train_on_prompt else _assistant_spans(tokenizer, messages, full)
    except Exception as e:  # jinja errors, raise_exception() in templates, our own ValueError
        raise OdloraError(f"{where}: chat template failed: {' '.join(str(e).split())}") from None
    # The template writes every special token itself (BOS included), so add none here.
    return _tokenize_spans(tokenizer, full, spans, add_special_tokens=False)


def _check_messages(where: str, messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise OdloraError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OdloraError(f'{where}: messages[{i}] must be an object with "role" and "content"')
        if m.get("role") not in ROLES:
            allowed = ", ".join(f'"{r}"' for r in ROLES)
            raise OdloraError(f"{where}: messages[{i}].role must be one of {allowed}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise OdloraError(f"{where}: messages[{i}].content must be a string, "
                              f"got {type(m.get('content')).__name__}")


def _assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in ``full``: content plus its end-of-turn token.

    The turn starts where the rendered prefix with a generation prompt ends (for ChatML, after
    "<|im_start|>assistant\\n"). Templates that rewrite earlier turns break that prefix property,
    so we fall back to searching the content after the previous span.
    """
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _try_render(tokenizer, messages[:i], add_generation_prompt=True)
        search_from = len(prefix) if prefix is not None and full.startswith(prefix) else cursor
        content = m["content"]
        start = full.find(content, search_from)
        if start < 0:  # templates that trim the content
            content = content.strip()
            start = full.find(content, search_from)
        if start < 0:
            raise ValueError(f"it does not reproduce messages[{i}].content")
        end = start + len(content)
        turn = _try_render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if turn is not None and full.startswith(turn) and len(turn) >= end:
            end = _end_of_turn(tokenizer, full, end, len(turn))
        spans.append((start, end))
        cursor = end
    return spans


def _try_render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str | None:
    try:  # some templates refuse a prefix (no messages, or one ending on a user turn)
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except Exception:
        return None


def _end_of_turn(tokenizer, full: str, content_end: int, turn_end: int) -> int:
    """Where the assistant's end-of-turn ends: through the first special token after the content
    ("<|im_end|>", not the newline after it), or the whole suffix if the template writes none."""
    suffix = full[content_end:turn_end]
    found = [(suffix.find(s), -len(s)) for s in tokenizer.all_special_tokens if s and s in suffix]
    if not found:
        return turn_end
    index, neg_len = min(found)
    return content_end + index - neg_len


def _tokenize_spans(tokenizer, text: str, spans, add_special_tokens: bool):
    """Tokenise ``text`` once; a token carries loss if its characters overlap a span."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(a < end and b > start for start, end in spans) for a, b in enc["offset_mapping"]]
    return ids, mask


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` ending in EOS (unchanged if the tokenizer added one or has none)."""
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


# ---------------------------------------------------------------- split, pack, batch


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic random split into (train, val), each kept in input order.

    With val_fraction > 0 and at least 2 examples, val gets at least one and train keeps one.
    """
    VAL_SPLIT.check(val_fraction, "val_fraction")
    n = len(examples)
    n_val = 0 if val_fraction == 0 or n < 2 else min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


@dataclass
class PackedData:
    """Rows of packed examples, each (N, seq_len) long tensors. Segments count 0, 1, ... per row;
    the padding at a row's end is one more segment of its own, with targets IGNORE."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    real_tokens: int  # positions that are not padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(examples: list[Example], seq_len: int, pad_id: int) -> PackedData:
    """Pack examples into rows of ``seq_len`` tokens by first-fit decreasing.

    Why FFD and not in-order next-fit: personalisation data is many short, uneven examples,
    where FFD fills rows better (the "dates" sample at seq_len 256 with SmolLM2's tokenizer:
    113 rows against 123), and the input order it gives up does not matter because ``batches``
    shuffles rows every epoch. Deterministic: a stable sort (ties keep input order), then always
    the first row with room.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []  # example indices per row
    space: list[int] = []  # free positions per row
    smallest = min((len(ex.input_ids) for ex in examples), default=0)
    open_rows: list[int] = []  # rows that can still take the smallest example
    for i in order:
        length = len(examples[i].input_ids)
        if length > seq_len:
            raise ValueError(f"example of {length} tokens does not fit seq_len {seq_len}")
        row = next((r for r in open_rows if space[r] >= length), None)
        if row is None:
            row = len(rows)
            rows.append([])
            space.append(seq_len)
            open_rows.append(row)
        rows[row].append(i)
        space[row] -= length
        if space[row] < max(smallest, 1):
            open_rows.remove(row)
    return _fill_rows(examples, rows, seq_len, pad_id)


def _fill_rows(examples: list[Example], rows: list[list[int]], seq_len: int, pad_id: int) -> PackedData:
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for seg, i in enumerate(members):
            n = len(examples[i].input_ids)
            input_ids[r, pos : pos + n] = torch.tensor(examples[i].input_ids)
            targets[r, pos : pos + n] = torch.tensor(examples[i].targets)
            segment_ids[r, pos : pos + n] = seg
            pos += n
        segment_ids[r, pos:] = len(members)  # padding: a segment of its own
    real_tokens = sum(len(examples[i].input_ids) for members in rows for i in members)
    return PackedData(input_ids, targets, segment_ids, real_tokens)


def batches(packed: PackedData, batch_size: int, seed: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of rows for one epoch (same seed and epoch, same order); last one may be short."""
    if batch_size < 1:
        raise OdloraError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed + epoch))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield {"input_ids": packed.input_ids[idx], "targets": packed.targets[idx],
               "segment_ids": packed.segment_ids[idx]}


# ---------------------------------------------------------------- statistics


@dataclass
class DataStats:
    """What the adapter was trained on, stored in its odlora.json."""

    files: int
    examples: int
    dropped: int
    tokens: int  # input tokens over all examples
    loss_tokens: int  # of which carry loss
    packed_rows: int
    padding_fraction: float  # of the packed positions

    def to_dict(self) -> dict:
        return asdict(self)


def data_stats(examples: list[Example], packed: PackedData, *, files: int, dropped: int) -> DataStats:
    """Statistics of ``examples`` and of the rows ``packed`` (usually the same examples)."""
    cells = packed.input_ids.numel()
    return DataStats(
        files=files,
        examples=len(examples),
        dropped=dropped,
        tokens=sum(len(ex.input_ids) for ex in examples),
        loss_tokens=sum(t != IGNORE for ex in examples for t in ex.targets),
        packed_rows=len(packed),
        padding_fraction=round(1 - packed.real_tokens / cells, 4) if cells else 0.0,
    )
