"""Text data for calibration, healing and perplexity (:mod:`mha2mla.data`): files, JSONL and directories, packed
into token blocks; bad data is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from mha2mla.data import load_texts, pack_tokens, token_blocks
from mha2mla.errors import Mha2mlaError
from tests.conftest import CORPUS, assert_user_error, convert_cli


def test_texts_from_a_file_jsonl_and_a_directory_in_order(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "b.txt").write_text("second file\n")
    lines = [{"text": "first doc"}, {"text": "  "}, {"text": "third doc"}]
    (data / "a.jsonl").write_text("\n\n".join(json.dumps(x) for x in lines) + "\n")
    (data / "notes.md").write_text("not data")
    # files in name order, blank documents dropped, other file types ignored
    assert load_texts(str(data)) == ["first doc", "third doc", "second file\n"]
    assert load_texts(str(data), max_docs=2) == ["first doc", "third doc"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    assert load_texts(str(tmp_path / "c.jsonl"), text_field="content") == ["x"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(Mha2mlaError, match="directory holds no .txt or .jsonl files"):
        load_texts(str(tmp_path / "empty"))
    with pytest.raises(Mha2mlaError, match="data 'no-such-file.txt' does not exist"):
        load_texts("no-such-file.txt")


def test_token_blocks_cut_in_order_or_in_a_seeded_order():
    tokens = torch.arange(23)
    blocks = token_blocks(tokens, seq_len=5)
    assert torch.equal(blocks, torch.arange(20).view(4, 5))  # the tail of 3 is dropped
    mixed = token_blocks(tokens, seq_len=5, seed=3)
    assert torch.equal(mixed, token_blocks(tokens, seq_len=5, seed=3)) and not torch.equal(mixed, blocks)
    assert sorted(mixed[:, 0].tolist()) == [0, 5, 10, 15] and token_blocks(tokens, seq_len=5, n_blocks=2).shape == (2, 5)
    with pytest.raises(Mha2mlaError, match="data has 23 tokens, fewer than one block of 24"):
        token_blocks(tokens, seq_len=24)
    with pytest.raises(Mha2mlaError, match="sequence length must be positive, got 0"):
        token_blocks(tokens, seq_len=0)


def test_long_document_is_tokenised_on_a_prefix_with_the_same_ids(tiny_source):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_source())
    long_doc = CORPUS * 40
    full = tok(long_doc, add_special_tokens=False)["input_ids"]
    for wanted in (1, 37, 300, len(full) - 5, len(full) + 50):
        got = pack_tokens(tok, [long_doc, "the cat sat"], max_tokens=wanted)
        want = (full + [tok.eos_token_id] + tok("the cat sat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        assert got.tolist() == want[:wanted]


@pytest.mark.parametrize("kind,phrase", [
    ("binary", "not UTF-8 text"),
    ("directory", "cannot read (Is a directory)"),
    ("empty", "is empty: no text found"),
])
def test_bad_calibration_data(sources, tmp_path, kind, phrase):
    data = tmp_path / "calib"
    if kind == "binary":
        data = tmp_path / "calib.txt"
        data.write_bytes(bytes(range(128, 256)) * 8)
    elif kind == "directory":  # a directory where a text file is expected (unreadable as text)
        (data / "part-1.txt").mkdir(parents=True)
    else:
        data.write_text("  \n\n ")
    out = tmp_path / "out"
    assert_user_error(convert_cli(sources["src"], out, "--calibration", data), phrase, out)


@pytest.mark.parametrize("content,phrase", [
    ('{"body": "the cat sat"}\n', "no 'text' field (found ['body']); put each document's text under 'text'"),
    ('{"text": 5}\n', "the 'text' field is a int, not a string"),
])
def test_jsonl_without_text(sources, tmp_path, content, phrase):
    data = tmp_path / "calib.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    line = assert_user_error(convert_cli(sources["src"], out, "--calibration", data), phrase, out)
    assert "--text-field" not in line  # convert has no such option
