"""GGUF tokenizer export without transformers (llmbuild.source.gguf_tokenizer) against
transformers' own GGUF converter: the same tokenizer.json, the same tokenizer_config,
the same ids on a text corpus, for SmolLM2's GGUF and tiny GGUFs of each vocabulary kind."""

from __future__ import annotations

import json

import pytest

from llmbuild.source import open_source
from tests.tiny import make_tokenizer_gguf

LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
TEXTS = [
    "What is the capital of France?", "  Héllo, wörld!\n\ttabs  ", "1234567 + 89 = ?",
    "the quick brown fox jumps over the lazy dog", " hello world in an on", "Grüße — naïve café 東京 🙂🚀",
    "<|im_start|>user\nhello<|im_end|>\n<think>the dog</think>", "it's we'll THE Quick\r\n\n  x",
]


def corpus_lines(n: int = 200) -> list[str]:
    from llmbuild.eval.corpus import read_text

    text = read_text("kjv", "evaluation")
    return [line for line in text.splitlines() if line.strip()][:n]


def reference(gguf_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "tokenizer_config.json").read_text())
    return tok, json.loads((tmp_path / "ref" / "tokenizer.json").read_text()), {
        k: v for k, v in config.items() if k not in LOAD_TIME_KEYS
    }


def export(gguf_path, dst):
    with open_source(gguf_path, check=False) as src:
        info = src.export_tokenizer(dst)
    return info, json.loads((dst / "tokenizer.json").read_text()), json.loads((dst / "tokenizer_config.json").read_text())


def assert_same_tokenizer(gguf_path, tmp_path, texts):
    import tokenizers

    ref_tok, ref_json, ref_config = reference(gguf_path, tmp_path)
    info, ours_json, ours_config = export(gguf_path, tmp_path / "ours")
    assert ours_json == ref_json
    ours_config.pop("chat_template", None)
    assert ours_config == ref_config
    ours = tokenizers.Tokenizer.from_file(str(tmp_path / "ours" / "tokenizer.json"))
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == ref_tok(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids), text
    return info


@pytest.mark.parametrize("kind,kwargs", [
    ("llama", {}), ("llama", {"add_bos": False, "add_space_prefix": False}),
    ("gpt2", {}), ("gpt2", {"pre": "llama-bpe", "add_bos": True}), ("gpt2", {"pre": "qwen2"}),
])
def test_tiny_gguf_tokenizer_equals_transformers(tmp_path, kind, kwargs):
    path = make_tokenizer_gguf(tmp_path / "tok.gguf", kind, **kwargs)
    info = assert_same_tokenizer(path, tmp_path, TEXTS + corpus_lines(50))
    assert info["bos_token_id"] == 1 and info["eos_token_id"] == 2


def test_smollm2_gguf_tokenizer_equals_transformers(smollm2_path, tmp_path):
    info = assert_same_tokenizer(smollm2_path, tmp_path, TEXTS + corpus_lines(300))
    assert (info["bos_token_id"], info["eos_token_id"]) == (1, 2)
    assert "<|im_start|>" in info["chat_template"]


def test_gguf_tokenizer_export_imports_no_transformers(smollm2_path, tmp_path):
    """The CI path (compile --no-verify on the base install) exports a GGUF's tokenizer
    without transformers or torch."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from llmbuild.source import open_source\n"
        f"src = open_source(Path({str(smollm2_path)!r}))\n"
        f"info = src.export_tokenizer(Path({str(tmp_path / 'tok')!r}))\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "print(info['eos_token_id'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
