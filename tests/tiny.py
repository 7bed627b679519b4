"""Tiny random HF models for tests: made in-process with transformers, fixed seed.

    from tests.tiny import make_tiny_hf
    model_dir = make_tiny_hf(tmp_path / "m", tie=True, dtype="bfloat16", shards=2)

The directory is what `save_pretrained` writes (config.json in transformers 5 format,
i.e. rope settings under "rope_parameters" and "dtype" instead of "torch_dtype"), plus
a character-level tokenizer (tokenizer.json, tokenizer_config.json with a chat
template) whose vocabulary has exactly `vocab` entries, so every id the random model
can produce decodes. `load_tiny_hf(model_dir)` gives the reference torch model back.
"""

from __future__ import annotations

import json
from pathlib import Path

# Ids of the special tokens in the tiny tokenizer (and in the config).
UNK, BOS, EOS, IM_START, IM_END = range(5)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_hf(
    dst: Path,
    arch: str = "LlamaForCausalLM",
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
    intermediate: int = 128,
    tie: bool = False,
    rope_scaling: dict | None = None,
    max_pos: int = 256,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    rope_theta: float = 10000.0,
    head_dim: int | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write a random `arch` model with the given dims to `dst` and return `dst`.
    `head_dim` defaults to hidden // num_heads; `extra_config` adds keyword arguments of the
    architecture's config class (e.g. partial_rotary_factor)."""
    import torch
    import transformers

    classes = {  # HF class -> (config class, extra config kwargs)
        "LlamaForCausalLM": ("LlamaConfig", {}),
        "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
        "Qwen2ForCausalLM": ("Qwen2Config", {"use_sliding_window": False}),
        "Qwen3ForCausalLM": ("Qwen3Config", {"use_sliding_window": False}),
        "Phi3ForCausalLM": ("Phi3Config", {}),
    }
    config_name, extra = classes[arch]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, arch)
    extra = {**extra, **(extra_config or {})}
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    config = config_cls(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden // num_heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        rope_parameters=rope,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: give them values a graph must read
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
            elif ".q_norm." in name or ".k_norm." in name:
                param.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype)).eval()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = max(1, -(-total // shards)) if shards > 1 else "50GB"
    model.save_pretrained(dst, max_shard_size=max_shard)
    if shards > 1 and not (dst / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"save_pretrained did not shard {dst}")
    write_tiny_tokenizer(dst, vocab, max_pos)
    return dst


def load_tiny_hf(model_dir: Path):
    """The reference torch model of a tiny model directory (eval mode, stored dtype)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()


def write_tiny_tokenizer(dst: Path, vocab: int, max_pos: int = 256) -> None:
    """A reversible character-level tokenizer with exactly `vocab` tokens.

    Ids 0-4 are the special tokens, then printable ASCII and newline one character per
    token, then `<extra_i>` fillers up to `vocab`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    tokens = (SPECIALS + chars)[:vocab]
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(Path(dst) / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[BOS],
        "eos_token": SPECIALS[EOS],
        "unk_token": SPECIALS[UNK],
        "add_bos_token": False,
        "model_max_length": max_pos,
        "chat_template": CHAT_TEMPLATE,
    }
    (Path(dst) / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def make_tiny_gguf(hf_dir: Path, dst: Path, *, matrix_type: str = "Q8_0", llama3_rope: dict | None = None,
                   tokenizer: str | None = None) -> Path:
    """Convert a tiny HF Llama directory to a GGUF file the way llama.cpp does.

    Matrices are stored as `matrix_type` (a ggml type name), the embedding as F16,
    norms as F32; q_proj/k_proj rows get llama.cpp's rotary permutation. With
    `llama3_rope` (HF rope_scaling dict) a `rope_freqs.weight` tensor is written as
    llama.cpp does for Llama 3.x models. With `tokenizer` ("llama" or "gpt2") the
    vocabulary of `make_tokenizer_gguf` is written too (the model's vocab_size must be
    `tokenizer_vocab_size(tokenizer)`); else no tokenizer metadata is written.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    weights = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update(load_file(f))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    theta = config["rope_parameters"]["rope_theta"]

    writer = gguf.GGUFWriter(str(dst), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer:
        _add_tokenizer(writer, tokenizer)
    else:
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    qtype = gguf.GGMLQuantizationType[matrix_type]
    renames = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
    if llama3_rope:
        factor, low, high = llama3_rope["factor"], llama3_rope["low_freq_factor"], llama3_rope["high_freq_factor"]
        original = llama3_rope["original_max_position_embeddings"]
        freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * np.pi / freqs
        smooth = (original / wavelen - low) / (high - low)
        factors = np.where(wavelen > original / low, factor,
                           np.where(wavelen < original / high, 1.0, 1.0 / ((1 - smooth) / factor + smooth)))
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", w.astype(np.float16))
            continue
        if name in ("model.norm.weight", "lm_head.weight"):
            gname = {"model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gname = f"blk.{layer}.{renames[module]}.weight"
            if module == "self_attn.q_proj":
                w = permute(w, heads)
            elif module == "self_attn.k_proj":
                w = permute(w, kv_heads)
        if w.ndim == 1:
            writer.add_tensor(gname, w)
        else:
            q = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def compile_tiny(model_dir: Path, out_dir: Path, *, name: str = "tiny", precision: str = "float32",
                 engines: tuple[str, ...] = (), limits: dict | None = None, verify: bool = False) -> Path:
    """Write a recipe for `model_dir` and compile it (no progress output); returns the artifact."""
    from llmbuild.compile import compile_recipe

    limits = limits or {"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128}
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = out_dir / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\nmodel:\n  source: {model_dir}\nprecision: {precision}\n"
        f"limits: {json.dumps(limits)}\nengines: {json.dumps(list(engines))}\n"
    )
    return compile_recipe(recipe, out_dir=out_dir, quiet=True, verify=verify)


def _tiny_vocab(kind: str) -> dict:
    """The tokens (and scores, types, merges) of the tiny GGUF vocabularies."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "in", "on", "an"]
    if kind == "llama":
        tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<think>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [2, 3, 3, 3, 4] + [6] * 256
        pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
        for w in words:  # every prefix of "▁word", so the merges can reach it
            for i in range(2, len(w) + 2):
                for p in ("▁" + w)[:i], w[:i - 1]:
                    if len(p) > 1 and p not in pieces:
                        pieces.append(p)
        scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
        return {"tokens": tokens + pieces, "types": types + [1] * len(pieces), "scores": scores, "merges": None,
                "ids": {"bos": 1, "eos": 2, "unk": 0}}
    if kind == "gpt2":
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"] + [chr(c) for c in cs]
        types = [3, 3, 3, 4] + [1] * 256
        merges = []
        for w in words:
            w = "Ġ" + w
            for i in range(2, len(w) + 1):
                if w[:i] not in tokens:
                    merges.append(f"{w[:i - 1]} {w[i - 1]}")
                    tokens.append(w[:i])
                    types.append(1)
        return {"tokens": tokens, "types": types, "scores": None, "merges": merges,
                "ids": {"bos": 1, "eos": 2, "pad": 2, "unk": 0}}
    raise ValueError(kind)


def tokenizer_vocab_size(kind: str) -> int:
    return len(_tiny_vocab(kind)["tokens"])


def _add_tokenizer(writer, kind: str, *, add_bos: bool | None = None, add_space_prefix: bool | None = None,
                   pre: str | None = None) -> int:
    v = _tiny_vocab(kind)
    writer.add_tokenizer_model(kind)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(v["tokens"])
    writer.add_token_types(v["types"])
    if v["scores"] is not None:
        writer.add_token_scores(v["scores"])
    if v["merges"] is not None:
        writer.add_token_merges(v["merges"])
    ids = v["ids"]
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    return len(v["tokens"])


def make_tokenizer_gguf(dst: Path, kind: str, *, add_bos: bool | None = None, add_space_prefix: bool | None = None,
                        pre: str | None = None) -> Path:
    """A GGUF holding only a small vocabulary as llama.cpp writes it (and the few llama
    keys transformers reads to pick the tokenizer): `kind` "llama" (SentencePiece BPE:
    byte tokens, scores and no merges) or "gpt2" (byte-level BPE with merges). Both
    have a control token `<|im_start|>` and a user-defined token `<think>`."""
    import gguf

    writer = gguf.GGUFWriter(str(dst), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(_add_tokenizer(writer, kind, add_bos=add_bos, add_space_prefix=add_space_prefix, pre=pre))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def make_tiny_from_config(dst: Path, arch: str, config_kwargs: dict, *, seed: int = 0, dtype: str = "float32",
                          norm_noise: float = 0.2) -> Path:
    """Write a random `arch` model (HF class name) built from `config_kwargs` (one entry of
    tests.tiny_configs.TINY_SHAPES) and the tiny tokenizer to `dst`. Norm weights get
    N(0, norm_noise) added to HF's init, so that a norm's (1 + w) vs w matters."""
    import torch
    import transformers

    model_cls = getattr(transformers, arch)
    config = model_cls.config_class(**config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * norm_noise)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    write_tiny_tokenizer(dst, config.vocab_size, config.max_position_embeddings)
    return dst
