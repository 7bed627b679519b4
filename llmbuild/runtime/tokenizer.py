"""Tokenizer and chat template of an artifact (the `tokenizers` library plus Jinja)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from llmbuild.errors import UserError


class Tokenizer:
    def __init__(self, directory: Path, info: dict):
        from tokenizers import Tokenizer as HFTokenizer

        self.directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{directory.parent}: {directory.name}/tokenizer.json is missing; recompile the artifact")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise UserError(f"{path}: not a readable tokenizer ({str(e)[:160]}); recompile the artifact") from None
        self.bos_token_id = info.get("bos_token_id")
        self.eos_token_ids = list(info.get("eos_token_ids") or [])
        self.chat_template = info.get("chat_template")
        self.add_bos = bool(info.get("add_bos_token", False))
        config_path = directory / "tokenizer_config.json"
        try:
            self._config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"{config_path}: cannot read the tokenizer config: {str(e)[:160]}") from None
        if not isinstance(self._config, dict):
            raise UserError(f"{config_path}: expected a JSON object, found {type(self._config).__name__}")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render the model's chat template the way HF transformers does."""
        if not self.chat_template or not isinstance(self.chat_template, str):
            raise UserError("this artifact's tokenizer has no chat template; use raw prompts (chat=False, --raw)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, ensure_ascii=False, indent=indent)
        special = {k: self._config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in special.items()}
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except SecurityError as e:
            raise UserError(f"the chat template was refused by the sandbox: {e}") from None
        except TemplateError as e:
            raise UserError(f"the chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, RecursionError,
                OverflowError) as e:
            raise UserError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes the special tokens itself.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
