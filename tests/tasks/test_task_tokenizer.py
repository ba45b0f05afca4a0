"""Char-level tokenizer: pinned ids, exact round trip, and identical behaviour through transformers."""

from __future__ import annotations

import json

import pytest

from respec.tasks import VOCAB, ArithmeticTask, build_tokenizer, save_tokenizer_files

EXPECTED_VOCAB = [
    "<pad>", "<bos>", "<eos>", "<unk>", *"0123456789",
    "+", "-", "*", "=", "(", ")", ",", ".", " ", "\n", ":", "Q", "a", "n", "s",
]


@pytest.fixture(scope="module")
def texts():
    task = ArithmeticTask(seed=5)
    problems = task.problems(0, 300) + task.heldout(50)
    return [p.prompt + p.solution for p in problems] + [" (1, 2). ", "\n\n", ""]


def test_vocab_is_small_and_ids_are_pinned():
    tok = build_tokenizer()
    assert list(VOCAB) == EXPECTED_VOCAB and len(VOCAB) <= 64
    assert tok.get_vocab() == {t: i for i, t in enumerate(EXPECTED_VOCAB)}
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<bos>"), tok.token_to_id("<eos>")) == (0, 1, 2)
    assert build_tokenizer().to_str() == tok.to_str()


def test_round_trip_is_exact_and_char_level(texts):
    tok = build_tokenizer()
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
        with_bos = tok.encode(text).ids
        assert with_bos == [1] + ids and tok.decode(with_bos) == text


def test_unknown_characters_map_to_unk():
    tok = build_tokenizer()
    assert tok.encode("1x2", add_special_tokens=False).ids == [5, 3, 6]


def test_transformers_autotokenizer_matches(tmp_path, texts):
    transformers = pytest.importorskip("transformers")
    tok = build_tokenizer()
    save_tokenizer_files(tmp_path, tok, model_max_length=512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 512
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<eos>"

    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == len(VOCAB)
    for text in texts:
        ours = tok.encode(text).ids
        assert hf(text)["input_ids"] == ours
        assert hf.encode(text, add_special_tokens=False) == ours[1:]
        assert hf.decode(ours, skip_special_tokens=True) == text
        assert hf.decode(ours + [2], skip_special_tokens=False) == tok.decode(ours + [2], skip_special_tokens=False)
    batch = hf(["Q: 1+2=\n", "Q: 10+20=\n"], padding=True)["input_ids"]
    assert batch[0][-2:] == [0, 0]  # right padding with <pad>
