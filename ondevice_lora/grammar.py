"""Grammar-constrained decoding: an answer that must be JSON, or JSON matching a schema (OpenAI's
`response_format`), whatever the adapter would have said.

    grammar = json_grammar({"type": "object", "properties": {"name": {"type": "string"}}})
    sampling = SamplingConfig(grammar=grammar)               # generate.TokenChooser applies it
    # per token: GrammarState.allowed() masks the logits, GrammarState.accept(token) advances

The grammar engine is llguidance (Microsoft's, the one llama.cpp, vLLM and SGLang can use): a
compiled Rust library with no torch dependency that computes a token mask lazily, in tens of
microseconds a token for JSON schemas, with no per-schema precompilation over the vocabulary. We
chose it over xgrammar (also fast, but its CPU path is less exercised and it pulls more native
code) and outlines-core (builds an index over the whole vocabulary per schema: seconds for a
49k-token vocabulary, every new schema).

The answer's JSON is compact-spaced (`{"name": "Ada", "city": "Oslo"}`, as `json.dumps` writes it,
as the shipped samples are written): free whitespace would let a model pad an answer with newlines
until it runs out of tokens.
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import numpy as np

from .errors import OdloraError

# How the JSON may be spaced (see the module's docstring).
JSON_SPACING = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # HF tokenizer -> {stop ids: LLTokenizer}
_tokenizers_lock = threading.Lock()


def json_grammar(schema: Optional[dict] = None, param: str = "schema") -> str:
    """The grammar of JSON matching `schema` (None: any JSON object); a schema llguidance cannot
    compile is an OdloraError naming `param`."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT if schema is None else schema,
                                                                overrides=JSON_SPACING)
    except ValueError as e:
        raise OdloraError(f"not a JSON schema: {e}", param=param) from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise OdloraError(f"cannot constrain an answer to this schema: {first_line(problem)}", param=param)
    return grammar


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def grammar_tokenizer(tokenizer, stop_ids: frozenset):
    """llguidance's view of a Hugging Face fast tokenizer, with `stop_ids` as its end tokens: built
    once per tokenizer (about a second for a 49k vocabulary), then shared."""
    from llguidance.hf import from_tokenizer

    with _tokenizers_lock:
        built = _tokenizers.setdefault(tokenizer, {})
        if stop_ids not in built:
            if not stop_ids:
                raise OdloraError("this tokenizer has no end-of-text token: an answer could never end its grammar")
            built[stop_ids] = from_tokenizer(tokenizer, eos_token=sorted(stop_ids))
        return built[stop_ids]


class GrammarState:
    """Where one answer stands in its grammar: which tokens may come next."""

    def __init__(self, tokenizer, grammar: str, stop_ids: frozenset):
        import llguidance

        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, stop_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise OdloraError(f"the grammar does not compile: {first_line(self.matcher.get_error())}", param="grammar")

    def allowed(self, vocab_size: int) -> np.ndarray:
        """A (vocab_size,) bool mask of the tokens the grammar allows next; ids past the tokenizer's
        vocabulary (a padded LM head) are never allowed."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = np.zeros(vocab_size, dtype=bool)
        n = min(vocab_size, bits.size)
        mask[:n] = bits[:n]
        return mask

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise OdloraError(f"token {token} does not fit the grammar: {first_line(self.matcher.get_error())}")

    @property
    def complete(self) -> bool:
        """The answer is whole: only an end token may follow."""
        return self.matcher.is_stopped()

