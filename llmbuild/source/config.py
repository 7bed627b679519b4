"""HF-style model config: read a config.json and normalise it.

Normalisation makes later stages independent of the transformers version that wrote
the file:
- transformers 5 writes rope settings as `rope_parameters` ({"rope_type", "rope_theta",
  ...}) instead of top-level `rope_theta` / `rope_scaling`; older files have the latter,
  sometimes with "type" instead of "rope_type". Afterwards both `rope_theta` (float) and
  `rope_scaling` (None, or a dict with "rope_type" and without "rope_theta") are present.
- transformers 5 writes `dtype` where older versions wrote `torch_dtype`; both are set.
- `head_dim` and `num_key_value_heads` are filled in when the file leaves them implicit.
- A registered multimodal class built as its text part (`ArchitectureSpec.text_part`,
  e.g. Gemma3ForConditionalGeneration) gets its text decoder's config, flattened.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmbuild.errors import UserError

DEFAULT_ROPE_THETA = 10000.0


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_hf_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(
            f"{model_dir}: not a Hugging Face model directory (no config.json); "
            "expected a directory with config.json and *.safetensors, or a .gguf file"
        )
    return normalize_config(read_json(cfg_path))


def normalize_config(cfg: dict) -> dict:
    from llmbuild.models import text_part_of

    part = text_part_of(cfg)
    cfg = dict(part.config(cfg) if part else cfg)
    params = cfg.get("rope_parameters")
    flat = isinstance(params, dict) and not any(isinstance(v, dict) for v in params.values())
    params = dict(params) if flat else {}

    theta = cfg.get("rope_theta") or params.get("rope_theta") or DEFAULT_ROPE_THETA
    scaling = cfg.get("rope_scaling")
    if not isinstance(scaling, dict):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    if "rope_type" not in scaling and "type" in scaling:
        scaling["rope_type"] = scaling["type"]
    scaling.pop("type", None)
    if scaling.get("rope_type") in (None, "default"):
        scaling = None
    # A non-number is left as found: source.checks.config_problems reports it.
    cfg["rope_theta"] = float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else theta
    cfg["rope_scaling"] = scaling

    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    cfg["torch_dtype"] = cfg["dtype"] = dtype

    heads = cfg.get("num_attention_heads")
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
        if not cfg.get("num_key_value_heads"):
            cfg["num_key_value_heads"] = heads
        hidden = cfg.get("hidden_size")
        if not cfg.get("head_dim") and isinstance(hidden, int) and hidden % heads == 0:
            cfg["head_dim"] = hidden // heads
    cfg.setdefault("tie_word_embeddings", False)
    return cfg
