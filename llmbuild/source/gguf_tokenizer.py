"""A GGUF's vocabulary → `tokenizer.json`, with `tokenizers` alone (no transformers, no torch).

A GGUF stores its tokenizer as llama.cpp metadata (`tokenizer.ggml.model`, tokens, merges,
token types, special token ids). This module builds from it the very tokenizer that
transformers' GGUF converter (`transformers.integrations.gguf.gguf_tokenizer_mapping`,
5.24) builds, so that `compile --no-verify` needs only the base install and the HF
reference tokenizes exactly as the artifact does (tests/test_gguf_tokenizer.py compares
both, JSON and ids, on SmolLM2's GGUF and on tiny GGUFs of each supported kind).

    tok, tok_config = tokenizer_from_gguf(metadata)   # tokenizers.Tokenizer, tokenizer_config dict

One builder per `tokenizer.ggml.model` in `TOKENIZER_BUILDERS`; a vocabulary of another
kind raises `UnsupportedGGUFTokenizer` (the caller may fall back to transformers).
"""

from __future__ import annotations

from llmbuild.errors import UserError

# transformers' VERY_LARGE_INTEGER: what it saves as model_max_length when none is known.
_NO_MAX_LENGTH = int(1e30)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Special tokens as transformers names them, and the GGUF key of their id.
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


class UnsupportedGGUFTokenizer(UserError):
    """The GGUF's tokenizer kind has no builder here."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (as `transformers.convert_slow_tokenizer`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _generate_merges(vocab: dict[str, int], vocab_scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary, best score first (transformers' `generate_merges`)."""
    merges = []
    for merge, score in vocab_scores.items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _merges(md: dict, tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    if "tokenizer.ggml.merges" in md:
        return [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    scores = md.get("tokenizer.ggml.scores")
    if scores is None:
        raise UserError("the GGUF vocabulary has neither merges nor scores to derive them from")
    return _generate_merges(vocab, dict(zip(tokens, scores)))


def _byte_level(md: dict, special: dict):
    """Byte-level BPE (`tokenizer.ggml.model: gpt2`): transformers' GPT2Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(md, tokens, vocab), dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(md: dict, special: dict):
    """SentencePiece BPE (`tokenizer.ggml.model: llama`): transformers' LlamaTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    # transformers builds the BPE model with its own unk_token (unset here) and fuse_unk
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(md, tokens, vocab), fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok, None


# tokenizer.ggml.model → builder(metadata, special tokens) → (Tokenizer, its byte alphabet or None).
# Like transformers, neither honours `tokenizer.ggml.add_space_prefix` (SentencePiece
# always prepends "▁" to the first word, byte-level BPE never adds a space).
TOKENIZER_BUILDERS = {
    "gpt2": _byte_level,
    "llama": _sentencepiece,
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre → the split regex its merges were learned with (transformers'
# GGUF_PRE_TOKENIZER_SPLITS, for the pre-tokenizers of the architectures llmbuild builds).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


def tokenizer_from_gguf(md: dict):
    """(tokenizers.Tokenizer, tokenizer_config dict) from a GGUF's decoded metadata."""
    from tokenizers import AddedToken, Regex, pre_tokenizers, processors

    kind = md.get("tokenizer.ggml.model")
    builder = TOKENIZER_BUILDERS.get(kind)
    if builder is None:
        raise UnsupportedGGUFTokenizer(
            f"GGUF tokenizer kind {kind!r} has no builder in llmbuild (supported: {', '.join(sorted(TOKENIZER_BUILDERS))})"
        )
    tokens = md["tokenizer.ggml.tokens"]
    special = {name: tokens[md[key]] for name, key in _SPECIAL_IDS.items() if md.get(key) is not None}
    tok, alphabet = builder(md, special)
    split = PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre"))

    # The order transformers adds them in: the named special tokens (its TokenizersBackend),
    # then the control tokens, then the user-defined ones (non-special).
    tok.add_special_tokens([AddedToken(special[k], special=True, normalized=False) for k in
                            ("bos_token", "eos_token", "unk_token", "pad_token") if k in special])
    types = md.get("tokenizer.ggml.token_type") or ()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    add_bos = md.get("tokenizer.ggml.add_bos_token", True if kind == "llama" else None)
    add_eos = md.get("tokenizer.ggml.add_eos_token")
    bos, eos = special.get("bos_token"), special.get("eos_token")
    use_bos, use_eos = bool(add_bos) and bos is not None, bool(add_eos) and eos is not None
    single = " ".join([f"{bos}:0"] * use_bos + ["$A:0"] + [f"{eos}:0"] * use_eos)
    pair = " ".join([single] + [f"{bos}:1"] * use_bos + ["$B:1"] + [f"{eos}:1"] * use_eos)
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(bos, tok.token_to_id(bos))] * use_bos + [(eos, tok.token_to_id(eos))] * use_eos,
    )

    # What transformers' save_pretrained writes for it (minus where it was loaded from).
    tok_config = {"backend": "tokenizers", "bos_token": special.get("bos_token"), "eos_token": special.get("eos_token"),
                  "model_max_length": _NO_MAX_LENGTH, "pad_token": special.get("pad_token"),
                  "tokenizer_class": "TokenizersBackend", "unk_token": special.get("unk_token")}
    return tok, tok_config
