"""Character-level tokenizer for the built-in arithmetic task, as a Hugging Face `tokenizers` object.

What: one token per character of a fixed, small alphabet (digits, the operators and punctuation
the task uses, space, newline, the letters of "Q:" and "ans") plus the special tokens <pad>, <bos>,
<eos> and <unk>. Encoding with special tokens prepends <bos> (what the engine does to a prompt);
the engine appends <eos> to targets itself. `save_tokenizer_files` writes the files that make the
directory loadable by `transformers.AutoTokenizer` and by respec.models.Tokenizer.

Why char-level: the task is digit manipulation, and a ~5M-parameter model learns column arithmetic
far more easily when every digit is its own token; a vocabulary of a few dozen ids also keeps the
default model's embedding and LM head tiny.

Invariants:
  * Ids are byte-stable: they are the positions in VOCAB below, which only ever grows at the end.
  * decode(encode(text)) == text for any text over the alphabet (no normalizer, no added spaces:
    the decoder fuses tokens, and `clean_up_tokenization_spaces` is off in the saved config).
  * A character outside the alphabet encodes to <unk> (and so does not round-trip).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
CHARACTERS: tuple[str, ...] = (
    *"0123456789",
    "+", "-", "*", "=", "(", ")", ",", ".", " ", "\n", ":",
    "Q", "a", "n", "s",
)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CHARACTERS
DEFAULT_MODEL_MAX_LENGTH = 1024


def build_tokenizer() -> Tokenizer:
    """The task's char-level tokenizer (same ids on every call and every machine)."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token ([\s\S] so that newlines are matched too).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = vocab[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save_tokenizer_files(directory: str | os.PathLike, tokenizer: Tokenizer | None = None,
                         model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

    The directory then loads with `transformers.AutoTokenizer.from_pretrained` (as a
    PreTrainedTokenizerFast) and with respec.models.Tokenizer.from_dir, encoding and decoding
    exactly like `tokenizer`. Returns the directory.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    for token in (PAD, BOS, EOS):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"tokenizer has no {token} token; build it with build_tokenizer()")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        **special,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,  # keep " ," etc. exactly as generated
        "padding_side": "right",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return path
