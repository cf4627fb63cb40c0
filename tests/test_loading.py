"""Loading tokenizers (:mod:`mha2mla.loading`): no tokenizer, an unreadable one, or one larger than the model's
vocabulary is refused in one line, by every command that reads one."""

from __future__ import annotations

import os
import shutil

import pytest

from mha2mla.errors import Mha2mlaError
from mha2mla.loading import load_tokenizer
from tests.conftest import assert_user_error, build_source, convert_cli, copy_source, run_cli


def test_load_tokenizer_checks_files_readability_and_vocabulary(tiny_source, tmp_path):
    path = tiny_source(n_kv=2)  # the CORPUS word tokenizer: 58 tokens, vocabulary 97
    tok = load_tokenizer(path, vocab_size=97)
    assert len(tok) == 58 and tok.eos_token_id == 2
    with pytest.raises(Mha2mlaError) as e:
        load_tokenizer(path, what="teacher", vocab_size=50)
    assert str(e.value) == (f"teacher {path!r}: the tokenizer has 58 tokens but the model only 50 embeddings; the "
                            "tokenizer does not belong to this model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Mha2mlaError, match="model '.*empty' has no tokenizer \\(none of tokenizer.json, "
                                           "tokenizer_config.json\\)"):
        load_tokenizer(str(tmp_path / "empty"))
    shutil.copy(os.path.join(path, "tokenizer_config.json"), tmp_path / "empty")
    (tmp_path / "empty" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(Mha2mlaError, match="its tokenizer cannot be loaded"):
        load_tokenizer(str(tmp_path / "empty"))


def test_calibration_without_a_tokenizer(sources, tmp_path):
    src = copy_source(sources, tmp_path)
    for n in os.listdir(src):
        if n.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(src, n))
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out, "--calibration", sources["text"]), "has no tokenizer", out)


def test_calibration_file_is_checked_before_the_tokenizer(sources, tmp_path):
    src = copy_source(sources, tmp_path)
    (tmp_path / "src" / "tokenizer.json").write_text("{ not json")
    out = tmp_path / "out"
    assert_user_error(convert_cli(src, out, "--calibration", tmp_path / "missing.txt"), "does not exist", out)
    assert_user_error(convert_cli(src, out, "--calibration", sources["text"]), "its tokenizer cannot be loaded", out)


def test_tokenizer_larger_than_the_vocabulary(sources, tmp_path, mla):
    small = build_source(tmp_path / "small", n_kv=2, vocab=20)  # the corpus tokenizer has more than 20 words
    out = tmp_path / "out"
    assert_user_error(convert_cli(small, out, "--calibration", sources["text"]), "the tokenizer has", out)
    res = tmp_path / "res.json"
    r = run_cli("eval", small, "--ppl-data", sources["text"], "--no-cache", "--output", res, "-q")
    assert_user_error(r, "does not belong to this model", res)


def test_eval_without_a_tokenizer(mla, sources, tmp_path):
    model = shutil.copytree(mla, tmp_path / "notok")
    for n in os.listdir(model):
        if n.startswith(("tokenizer", "special_tokens")):
            os.remove(model / n)
    res = tmp_path / "res.json"
    r = run_cli("eval", model, "--ppl-data", sources["text"], "--no-cache", "--output", res, "-q")
    line = assert_user_error(r, "has no tokenizer (none of tokenizer.json, tokenizer_config.json); copy the", res)
    assert line.endswith("into it")
