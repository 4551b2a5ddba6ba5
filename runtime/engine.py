"""The runtime: open an export once, register packed adapters by id, serve requests that name them.

    from ondevice_lora.runtime import Runtime
    rt = Runtime.open("exports/onnx")                        # backend from the manifest's target
    rt.register_adapter("dates", "dates.onnx_adapter")       # checked against the export
    rt.generate("Normalise: March 5th, 2021", adapter="dates").text
    rt.generate(messages, adapter=[("dates", 0.7), ("contacts", 0.3)], strength=0.8,
                sampling=SamplingConfig(temperature=0.7, seed=1), on_text=print)

One base stays loaded (`rt.backend.session`); swapping adapters never reloads it. Adapters load
into an LRU cache with a byte budget: a cold one comes from disk on first use, an evicted one
reloads transparently. Requests may come from many threads; each runs with its own adapter (see
`backends.py` for which backends run them in parallel and which one at a time).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..base import load_tokenizer
from ..errors import ContextLengthExceeded, OdloraError, named
from ..formats.adapter_ids import check_adapter_id
from ..formats.manifest import read_manifest
from ..config import SamplingConfig
from ..generate import TextStream, TokenChooser, TokenLogprob
from ..grammar import grammar_tokenizer
from ..prompts import encode_prompt, has_chat_template, render_chat, stop_token_ids
from .adapters import (AdapterCache, RegisteredAdapter, blend_prompt_format, check_checksum, combine_slots, file_stamp,
                       label, normalise, read_sidecar)
from .backends import Backend, Loaded, open_backend

DEFAULT_CACHE_BYTES = 256 * 2**20  # about 13 rank-16 all-linear adapters of the default base (fp32 slots)

AdapterArg = Union[None, str, list]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens (a stop token excluded)
    prompt_tokens: int
    adapter: Optional[str]  # None: the base; "id"; or "a:0.5+b:1" for a blend or a strength
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max tokens or the cache's end)
    seconds: float
    prefill_seconds: float
    prompt_format: str = "chat"  # how the prompt was rendered: "chat" (template) or "raw"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked for

    def to_dict(self) -> dict:
        return {"text": self.text, "adapter": self.adapter, "tokens": len(self.token_ids),
                "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason,
                "seconds": round(self.seconds, 4), "prefill_seconds": round(self.prefill_seconds, 4)}


@dataclass
class Runtime:
    export_dir: Path
    manifest: dict
    backend: Backend
    tokenizer: object
    cache: AdapterCache
    adapters: dict[str, RegisteredAdapter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # A fast tokenizer's Rust object raises "Already borrowed" when one thread encodes (which may
    # reset truncation/padding, a mutable borrow) while another uses it: encode/decode take turns.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, export_dir, backend: Optional[str] = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
             threads: Optional[int] = None, verify: bool = True) -> "Runtime":
        """Verify the export's checksums, load its tokenizer and its base once.

        backend: None (the export's target), "onnx", "executorch", or "torch" (the PyTorch
        reference, which loads the export's base by its spec and checks its fingerprint).
        verify=False skips the checksums when the caller has just checked them (a bundle).
        """
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir, verify=verify)
        tokenizer_dir = export_dir / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise OdloraError(f"{export_dir}: no tokenizer/ directory in the export")
        tokenizer = load_tokenizer(tokenizer_dir)
        return cls(export_dir, manifest, open_backend(export_dir, manifest, backend, threads), tokenizer,
                   AdapterCache(cache_bytes))

    @classmethod
    def open_bundle(cls, bundle_dir, adapter_bundles=(), **kwargs) -> "Runtime":
        """Open an app bundle (`odlora bundle`): verify it and every adapter bundle against it,
        load its base, and register every adapter under its bundled id."""
        from .bundle import open_bundle

        bundle = open_bundle(bundle_dir)
        extras = [open_bundle(path, base=bundle) for path in adapter_bundles]
        rt = cls.open(bundle.base_dir, verify=False, **kwargs)  # open_bundle hashed every file already
        for b in (bundle, *extras):
            for adapter_id, blob in b.adapter_files().items():
                rt.register_adapter(adapter_id, blob)
        return rt

    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    # -- adapters ---------------------------------------------------------------------------------

    def register_adapter(self, adapter_id: str, blob_path) -> dict:
        """Check a packed blob against this export and make it available as `adapter_id`.

        Checks the sidecar (target, base fingerprint, sha256) and loads the blob once (its
        tensors against the export's slots); it then stays in the cache while the budget allows.
        Registering an id again replaces it. Returns the sidecar.
        """
        check_adapter_id(adapter_id)
        blob = Path(blob_path)
        info = read_sidecar(blob, self.manifest)
        entry = RegisteredAdapter(adapter_id, blob, info, info["sha256"], file_stamp(blob))
        self.cache.get_or_load(entry.key, lambda: self._load_packed(entry))  # a bad blob fails here, not in a request
        with self._lock:
            self.adapters[adapter_id] = entry
        return info

    def unregister_adapter(self, adapter_id: str) -> None:
        with self._lock:
            if self.adapters.pop(adapter_id, None) is None:
                raise OdloraError(f"unknown adapter {adapter_id!r}")

    def _load_packed(self, entry: RegisteredAdapter) -> Loaded:
        if not entry.path.is_file():
            raise OdloraError(f"adapter {entry.id!r}: {entry.path} is gone")
        if file_stamp(entry.path) != entry.stamp:  # changed since registration: the checksum decides
            check_checksum(entry.path, entry.info)
        try:
            return self.backend.load_packed(entry.path)
        except OdloraError as e:
            raise OdloraError(f"adapter {entry.id!r}: {e}") from None

    def resolve_adapter(self, adapter: AdapterArg, strength: float = 1.0) -> tuple[Optional[Loaded], Optional[str]]:
        """The loaded adapter for a request (None: the base) and its label: what a request does before
        its first forward (the swap the demo and bench/bench_runtime.py time)."""
        with self._lock:
            registered = dict(self.adapters)
        parts = normalise(adapter, strength, registered)
        if not parts:
            return None, None
        if len(parts) == 1 and parts[0][1] == 1.0:
            entry = registered[parts[0][0]]
            return self.cache.get_or_load(entry.key, lambda: self._load_packed(entry)), label(parts)
        entries = [(registered[name], w) for name, w in parts]
        key = ("derived", tuple((e.sha256, w) for e, w in entries))

        def build() -> Loaded:
            slots = [(e.id, self._read_slots(e), w) for e, w in entries]
            return self.backend.from_slots(combine_slots(slots, self.backend.spec))

        return self.cache.get_or_load(key, build), label(parts)

    def _read_slots(self, entry: RegisteredAdapter) -> dict[str, torch.Tensor]:
        if file_stamp(entry.path) != entry.stamp:
            check_checksum(entry.path, entry.info)
        return self.backend.read_slots(entry.path)

    def stats(self) -> dict:
        return {"backend": self.backend.name, "adapters": sorted(self.adapters),
                "cache_bytes": self.cache.nbytes, "cache_budget": self.cache.budget, "cache_entries": len(self.cache.keys()),
                "adapter_loads": self.cache.loads, "cache_hits": self.cache.hits, "evictions": self.cache.evictions}

    # -- requests ---------------------------------------------------------------------------------

    def prompt_format(self, adapter: AdapterArg = None) -> str:
        """How `adapter` (an id, a blend or None for the base) was trained to be asked: "chat"
        (the chat template) or "raw" (`personalize --format raw`)."""
        with self._lock:
            registered = dict(self.adapters)
        return blend_prompt_format(normalise(adapter, 1.0, registered), registered)

    def encode(self, prompt, chat: bool = True) -> list[int]:
        """Token ids for a prompt string (chat-templated when `chat` and the tokenizer has a
        template), for a list of {"role", "content"} messages (templated; with `chat` False,
        for an adapter trained on raw text, a single user message is fed as its raw content), or
        for a list of token ids (fed as they are)."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return self.check_token_ids(prompt, "prompt")
        is_messages = (isinstance(prompt, list) and bool(prompt)
                       and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt))
        if not isinstance(prompt, str) and not is_messages:
            raise OdloraError("a prompt is a string, a list of {'role', 'content'} messages or a list of token ids")
        if is_messages and not chat:
            if len(prompt) != 1 or prompt[0]["role"] != "user" or not isinstance(prompt[0]["content"], str):
                raise OdloraError("this adapter was trained on raw prompts (--format raw): send one user message, "
                                  "or a plain prompt")
            prompt, is_messages = prompt[0]["content"], False
        if is_messages and not has_chat_template(self.tokenizer):
            raise OdloraError("this export's tokenizer has no chat template: pass a plain prompt")
        with self._tokenizer_lock:
            if is_messages:
                text = render_chat(self.tokenizer, prompt, add_generation_prompt=True)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = encode_prompt(self.tokenizer, prompt, chat=chat)
        if not ids:
            raise OdloraError("the prompt is empty")
        return ids

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        """`ids` when each is a token of this export's vocabulary."""
        bad = [t for t in ids if not 0 <= t < len(self.tokenizer)]
        if bad:
            raise OdloraError(f"{bad[0]} is not a token id of this export (0 to {len(self.tokenizer) - 1})", param=param)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:  # a fast tokenizer is not safe to share across threads
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text on its own (a piece of a multi-byte character decodes as U+FFFD)."""
        return self.detokenize([token])

    def token_bytes(self, token: int) -> bytes:
        """One token's exact UTF-8 bytes (a piece of a multi-byte character included), read through
        llguidance's tokenizer (grammar.py), which knows each tokenizer family's byte encoding."""
        stop_ids = stop_token_ids(self.tokenizer, self.manifest.get("config", {}))
        return grammar_tokenizer(self.tokenizer, frozenset(stop_ids)).decode_bytes([token])

    def generate(self, prompt, adapter: AdapterArg = None, strength: float = 1.0,
                 sampling: Optional[SamplingConfig] = None, on_text: Optional[Callable[[str], None]] = None,
                 chat: Optional[bool] = None, logprobs: Optional[int] = None,
                 on_logprobs: Optional[Callable[[list[TokenLogprob]], None]] = None) -> GenerationResult:
        """Prefill the prompt, decode with the KV cache, return the text (cut at a stop string).

        prompt: a string, chat messages or token ids. adapter: None (the base), an id, or a blend
        [(id, weight), ...]; `strength` scales the whole adapter (0: the base). `chat`: None asks
        the adapter the way it was trained (`prompt_format`), True/False force the chat template
        or raw text. `on_text` receives the text as it becomes final (held back while it could
        still become a stop string). `logprobs`: record each token's log-probability and this many
        alternatives (`GenerationResult.logprobs`); `on_logprobs` receives them, just before the
        `on_text` call for the text they make (the rest are in the result).
        """
        started = time.perf_counter()
        cfg = sampling or SamplingConfig()
        self.check_token_ids(list(cfg.logit_bias), "logit_bias")
        prompt_format = self.prompt_format(adapter) if chat is None else ("chat" if chat else "raw")
        ids = self.encode(prompt, chat=prompt_format == "chat")
        n = len(ids)
        if n >= self.max_seq_len:
            raise ContextLengthExceeded(f"the prompt has {n} tokens; this export's {named('max_seq_len')} "
                                        f"{self.max_seq_len} leaves room for at most {self.max_seq_len - 1} "
                                        f"before generating")
        loaded, name = self.resolve_adapter(adapter, strength)
        stop_ids = stop_token_ids(self.tokenizer, self.manifest.get("config", {}))
        chooser = TokenChooser.for_answer(cfg, self.tokenizer, frozenset(stop_ids), logprobs)
        finish = "length"
        stream = TextStream(self.detokenize, cfg.stop, self._final_text(chooser, on_text, on_logprobs))
        with self.backend.sequence(loaded) as seq:  # a serial backend may wait here for its turn
            prefill_started = time.perf_counter()
            logits = seq.forward(ids, 0)
            prefill_seconds = time.perf_counter() - prefill_started
            for pos in range(n, min(self.max_seq_len, n + cfg.max_new_tokens)):
                token = chooser.choose(logits)
                if token in stop_ids:
                    del chooser.record[len(stream.tokens):]  # the end token is no part of the answer
                if token in stop_ids or stream.push(token):
                    finish = "stop"
                    break
                if pos + 1 < self.max_seq_len and len(stream.tokens) < cfg.max_new_tokens:
                    logits = seq.forward([token], pos)
        text, tokens = stream.close(), stream.tokens
        return GenerationResult(text, tokens, n, name, finish, time.perf_counter() - started, prefill_seconds,
                                prompt_format, chooser.record)

    @staticmethod
    def _final_text(chooser: TokenChooser, on_text, on_logprobs):
        """`on_text`, preceded by `on_logprobs` with the log-probabilities not handed on yet."""
        if on_text is None or on_logprobs is None:
            return on_text
        handed = 0

        def final_text(text: str) -> None:
            nonlocal handed
            on_logprobs(chooser.record[handed:])
            handed = len(chooser.record)
            on_text(text)

        return final_text
