"""Tokenizer from a Hugging Face checkpoint directory, without importing transformers.

Reads `tokenizer.json` with the `tokenizers` library and the special tokens / chat template from
`tokenizer_config.json` (or `chat_template.jinja`, where transformers >= 4.43 puts it). Encoding a
plain prompt applies the tokenizer's own post-processor (e.g. a BOS token), as transformers does
with add_special_tokens=True; a chat-templated prompt is rendered first and encoded without extra
special tokens, as `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    pass


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # AddedToken serialized form
        return v.get("content")
    return v


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self._tok = tok
        self.config = dict(config or {})
        self.chat_template = chat_template or self.config.get("chat_template")
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))

    # ---- loading / saving ----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception subclass on parse errors
            raise TokenizerError(f"{tj}: cannot be parsed: {e}") from e
        config: dict[str, Any] = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            config = json.loads(tc.read_text())
        template = None
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        return cls(tok, config, template)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (+ chat template) into `path`."""
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template and "chat_template" not in config:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    # ---- use ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # lazy: only chat prompts need it

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, prompt: str) -> list[int]:
        text = self.apply_chat_template([{"role": "user", "content": prompt}])
        return self.encode(text, add_special_tokens=False)


def _raise(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")
