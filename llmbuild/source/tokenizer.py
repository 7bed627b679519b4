"""Shared last step of tokenizer export: one tokenizer_config.json and a summary.

Both sources first put a `tokenizer.json` into the destination; this module then writes
`tokenizer_config.json` with the chat template inlined (transformers 5 saves it to a
separate chat_template.jinja) and resolves the special tokens to ids, so runtimes need
only `tokenizers` and this one JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmbuild.errors import UserError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Keys transformers records about where it loaded from, not about the tokenizer.
_LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


def token_content(value) -> str | None:
    """A special token as stored in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def pick_chat_template(value) -> str | None:
    """tokenizer_config's chat_template may be a string or a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def finish_export(dst_dir: Path, tok_config: dict, chat_template: str | None, config: dict) -> dict:
    """Write dst_dir/tokenizer_config.json and return the tokenizer summary.

    Ids come from the model config (what HF `generate` uses) and fall back to looking
    the special token strings up in dst_dir/tokenizer.json.
    """
    import tokenizers

    tok_file = dst_dir / "tokenizer.json"
    try:
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise UserError(f"{tok_file}: cannot be loaded by the tokenizers library: {e}") from e

    tok_config = {k: v for k, v in tok_config.items() if k not in _LOAD_TIME_KEYS}
    if chat_template:
        tok_config["chat_template"] = chat_template
    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        content = token_content(tok_config.get(key))
        if content is not None:
            special[key] = {"content": content, "id": tok.token_to_id(content)}

    def resolve(key: str):
        value = config.get(f"{key}_id")
        if value is None and key in special:
            value = special[key]["id"]
        return value

    with open(dst_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    return {
        "bos_token_id": resolve("bos_token"),
        "eos_token_id": resolve("eos_token"),
        "pad_token_id": resolve("pad_token"),
        "chat_template": chat_template,
        "special_tokens": special,
    }
