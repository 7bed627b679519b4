"""Structured output: a grammar (JSON schema, or any JSON object) enforced while sampling.

    Grammar.json_schema(schema, tokenizer) ──► one compiled grammar (shared by requests)
        .matcher() ──► Constraint (one per request): mask(logits) ──► sample ──► accept(token)

The grammar engine is llguidance (the `llguidance` package, a Rust library with a
numpy interface): it needs no torch, builds its token table straight from the
artifact's `tokenizer.json` (tokenizers' own format), computes a vocabulary bitmask
per step in tens of microseconds, and supports the JSON Schema subset OpenAI's
structured outputs use. xgrammar needs torch for its masks; outlines-core builds a
regex index per schema, which is slow for large schemas. Tokenizers whose decoder
llguidance cannot read from the JSON (e.g. a `Fuse` decoder) are given to it as a
table of token bytes instead.

A disallowed token gets logit -inf before the sampling steps of
`llmbuild.runtime.sampling`, so every sampling option (temperature, top-k/top-p,
penalties, seeds) works unchanged on the allowed tokens. When the grammar is complete
and admits nothing more (`stopped`), the request ends with finish_reason "stop".
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from llmbuild.errors import UserError

# Output JSON without runs of free whitespace: a sampled model could otherwise spend
# all of max_tokens on blanks between two tokens of a valid object.
_JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError as e:  # an optional dependency
        raise UserError("structured output needs llguidance: pip install 'llmbuild[serve]'") from e
    return llguidance


class GrammarTokenizer:
    """llguidance's view of an artifact's tokenizer, built once (about a second for a
    50k vocabulary) and shared by every grammar of that artifact."""

    def __init__(self, tokenizer, vocab_size: int):
        llg = _llguidance()
        self.vocab_size = vocab_size
        eos = list(tokenizer.eos_token_ids)
        path = Path(tokenizer.directory) / "tokenizer.json"
        try:
            self.ll = llg.LLTokenizer(path.read_text(), n_vocab=vocab_size, eos_token=eos or None)
        except ValueError:  # a decoder llguidance does not read: hand it each token's bytes
            self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_ByteTable(tokenizer.tok, vocab_size, eos)),
                                      n_vocab=vocab_size, eos_token=eos or None)


class _ByteTable:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the special ids,
    and an encoder. Exact for tokenizers whose tokens decode to whole characters."""

    def __init__(self, tok, vocab_size: int, eos: list[int]):
        self._tok = tok
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = None
        self.tokens = [tok.decode([i], skip_special_tokens=False).encode("utf-8") for i in range(vocab_size)]
        self.special_token_ids = [i for i, t in tok.get_added_tokens_decoder().items() if t.special and i < vocab_size]

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


class Grammar:
    """A compiled grammar; `matcher()` gives the per-request state."""

    def __init__(self, spec: str, tokenizer: GrammarTokenizer):
        llg = _llguidance()
        problem = llg.LLMatcher.validate_grammar(spec, tokenizer.ll)
        if problem and not problem.startswith("WARNING"):
            raise UserError(f"the JSON schema cannot be used for structured output: {problem}")
        self.spec = spec
        self.tokenizer = tokenizer

    @classmethod
    def json_schema(cls, schema: dict | str | None, tokenizer: GrammarTokenizer) -> "Grammar":
        """A grammar for JSON text matching `schema` (None: any JSON object)."""
        llg = _llguidance()
        if schema is None:
            schema = {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise UserError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise UserError(f"a JSON schema must be an object, got {type(schema).__name__}")
        spec = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        return cls(spec, tokenizer)

    def matcher(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One request's position in its grammar: masks logits, accepts sampled tokens."""

    def __init__(self, grammar: Grammar):
        llg = _llguidance()
        self._llg = llg
        self.vocab_size = grammar.tokenizer.vocab_size
        self.matcher = llg.LLMatcher(grammar.tokenizer.ll, grammar.spec)
        self.bitmask = llg.numpy.allocate_token_bitmask(1, self.vocab_size)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"structured output: {self.matcher.get_error()}")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids at -inf."""
        self._llg.numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self._check()
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: logits.shape[-1]].astype(bool)
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~allowed] = -np.inf
        return out

    def accept(self, token: int) -> None:
        self.matcher.consume_token(int(token))
        self._check()

    @property
    def stopped(self) -> bool:
        """The grammar is complete and admits no further token."""
        return self.matcher.is_stopped()


_lock = threading.Lock()


def grammar_tokenizer(model) -> GrammarTokenizer:
    """The GrammarTokenizer of a LoadedModel, made on first use."""
    with _lock:
        tok = getattr(model, "_grammar_tokenizer", None)
        if tok is None:
            vocab = model.manifest["model"].get("vocab_size") or model.tokenizer.tok.get_vocab_size(True)
            tok = model._grammar_tokenizer = GrammarTokenizer(model.tokenizer, vocab)
        return tok
