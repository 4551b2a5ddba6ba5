"""Regenerate the shipped sample datasets::

    python -m ondevice_lora.samples.generate

Writes ``<task>/train.jsonl`` (400 examples) and ``<task>/test.jsonl`` (100)
for the ``dates`` and ``contacts`` tasks next to this file (or under
``--out``). The output depends only on the seed (stdlib ``random`` only).

Every pool of values or phrasings is a pair ``(seen, held_out)``: train draws
only from ``seen``; test also draws from ``held_out`` (30% of the time), so the
test split holds names, cities, years and phrasings never seen in training.
No answer occurs twice within a task, so train and test share no example.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path
from typing import Callable

SPLIT_SIZES = {"train": 400, "test": 100}
HELD_OUT_RATE = 0.3

Pool = tuple[tuple, tuple]  # (seen in train and test, test only)
Maker = Callable[[random.Random, str], tuple[str, str]]  # -> (prompt, answer)


def pick(rng: random.Random, pool: Pool, split: str):
    """Draw from a pool; only the test split may reach its held-out part."""
    seen, held_out = pool
    use_held_out = split == "test" and rng.random() < HELD_OUT_RATE
    return rng.choice(held_out if use_held_out else seen)


# --- dates: free-form English date -> YYYY-MM-DD -----------------------------

MONTHS = ("January February March April May June July August September "
          "October November December").split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth "
            "eleventh twelfth thirteenth fourteenth fifteenth sixteenth "
            "seventeenth eighteenth nineteenth twentieth").split()


def ordinal_word(n: int) -> str:
    """1 -> 'first', 22 -> 'twenty-second', 30 -> 'thirtieth'."""
    if n <= 20:
        return ORDINALS[n - 1]
    if n == 30:
        return "thirtieth"
    return ("twenty-" if n < 30 else "thirty-") + ORDINALS[n % 10 - 1]


def ordinal_suffix(n: int) -> str:
    """1 -> 'st', 12 -> 'th', 23 -> 'rd'."""
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _month(d: dt.date) -> str:
    return MONTHS[d.month - 1]


DATE_FORMATS = (  # (render, earliest year the form can express unambiguously)
    (lambda d: f"{_month(d)} {d.day}, {d.year}", 1950),
    (lambda d: f"{_month(d)} {d.day}{ordinal_suffix(d.day)}, {d.year}", 1950),
    (lambda d: f"{d.day} {_month(d)} {d.year}", 1950),
    (lambda d: f"the {ordinal_word(d.day)} of {_month(d)} {d.year}", 1950),
    (lambda d: f"{WEEKDAYS[d.weekday()]}, {_month(d)} {d.day}, {d.year}", 1950),
    (lambda d: f"{d.day}-{_month(d)[:3]}-{d.year}", 1950),
    (lambda d: f"{_month(d)[:3]} {d.day} '{d.year % 100:02d}", 2000),
    (lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (US)", 1950),
    (lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (UK)", 1950),
)
HELD_OUT_YEARS = (1968, 1987, 2004, 2019, 2033)
YEARS: Pool = (tuple(y for y in range(1950, 2040) if y not in HELD_OUT_YEARS),
               HELD_OUT_YEARS)
DATE_PROMPTS: Pool = (
    ("Convert this date to ISO 8601 (YYYY-MM-DD): {}",
     "Normalise the date to YYYY-MM-DD: {}",
     "What is {} in ISO format? Reply with YYYY-MM-DD only.",
     "Rewrite as an ISO 8601 date: {}",
     "Date: {}\nGive it as YYYY-MM-DD.",
     'Turn "{}" into an ISO date.'),
    ("Format {} as YYYY-MM-DD.",
     "ISO 8601 version of {}, please."),
)


def make_date(rng: random.Random, split: str) -> tuple[str, str]:
    render, first_year = rng.choice(DATE_FORMATS)
    year = pick(rng, YEARS, split)
    while year < first_year:
        year = pick(rng, YEARS, split)
    start = dt.date(year, 1, 1)
    day = start + dt.timedelta(days=rng.randrange((dt.date(year + 1, 1, 1) - start).days))
    return pick(rng, DATE_PROMPTS, split).format(render(day)), day.isoformat()


# --- contacts: sentence -> {"name": ..., "city": ...} ------------------------

FIRST_NAMES: Pool = (
    ("Alice", "Omar", "Priya", "Lukas", "Mei", "Carlos", "Fatima", "Jonas",
     "Aisha", "Daniel", "Sofia", "Kenji", "Nadia", "Tomas", "Grace", "Ibrahim",
     "Elena", "Marcus", "Hana", "Pedro", "Chloe", "Ravi", "Ingrid", "Samuel",
     "Leila", "Victor", "Yuki", "Bianca", "Oscar", "Amara"),
    ("Tariq", "Freya", "Mateo", "Ines", "Kwame", "Rosa", "Dmitri", "Zara"),
)
LAST_NAMES: Pool = (
    ("Novak", "Okafor", "Lindqvist", "Tanaka", "Moreno", "Haddad", "Fischer",
     "Kowalski", "Mensah", "Rossi", "Patel", "O'Brien", "Schmidt", "Nguyen",
     "Costa", "Andersen", "Kim", "Dubois", "Silva", "Becker", "Chen", "Walsh",
     "Yilmaz", "Bergstrom", "Murphy"),
    ("Achebe", "Varga", "Moreau", "Castillo", "Holm", "Sato"),
)
CITIES: Pool = (
    ("Lisbon", "Nairobi", "Toronto", "Osaka", "Krakow", "Lima", "Hamburg",
     "Melbourne", "Austin", "Cairo", "Dublin", "Seoul", "Porto", "Denver",
     "Hanoi", "Oslo", "Mumbai", "Bogota", "Vienna", "Glasgow", "San Diego",
     "New York", "Cape Town", "Buenos Aires"),
    ("Reykjavik", "Kuala Lumpur", "Montreal", "Tbilisi", "Salt Lake City", "Accra"),
)
CONTACT_SENTENCES: Pool = (
    ("{name} moved to {city} last spring.",
     "I had lunch with {name} in {city} today.",
     "{name}, who lives in {city}, called this morning.",
     "Met {name} at a conference in {city}.",
     "Our new colleague {name} works from {city}.",
     "{city} is where {name} grew up.",
     "Please send the invoice to {name} in {city}.",
     "Remind me to visit {name} when I'm in {city}."),
    ("{name} just got back home to {city}.",
     "Spent the weekend in {city} with {name}."),
)
CONTACT_PROMPTS: Pool = (
    ("Extract the name and city as JSON: {}",
     "{}\nReturn JSON with keys name and city.",
     "Give me a JSON object (name, city) for this: {}",
     "Text: {}\nOutput the person and city as JSON."),
    ("Pull out the person's name and the city as JSON. {}",),
)


def make_contact(rng: random.Random, split: str) -> tuple[str, str]:
    name = f"{pick(rng, FIRST_NAMES, split)} {pick(rng, LAST_NAMES, split)}"
    city = pick(rng, CITIES, split)
    sentence = pick(rng, CONTACT_SENTENCES, split).format(name=name, city=city)
    prompt = pick(rng, CONTACT_PROMPTS, split).format(sentence)
    return prompt, json.dumps({"name": name, "city": city})


TASKS: dict[str, Maker] = {"dates": make_date, "contacts": make_contact}


# --- writing -----------------------------------------------------------------

def build_splits(make: Maker, rng: random.Random) -> dict[str, list[dict]]:
    """Draw every split of one task, never repeating an answer."""
    used: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in SPLIT_SIZES.items():
        rows = splits[split] = []
        while len(rows) < size:
            prompt, answer = make(rng, split)
            if answer in used:
                continue
            used.add(answer)
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": answer}]})
    return splits


def write_split(path: Path, rows: list[dict]) -> None:
    """Write one split as JSON lines (one chat example per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_all(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write every task's splits under ``out_dir``; return the written paths."""
    written = []
    for task, make in TASKS.items():
        rng = random.Random(f"{task}:{seed}")  # per-task stream, stable across runs
        for split, rows in build_splits(make, rng).items():
            path = Path(out_dir) / task / f"{split}.jsonl"
            write_split(path, rows)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output directory (default: the package's samples folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
