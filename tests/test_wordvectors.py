"""Word-vector files: GloVe text, fastText .vec, word2vec binary, and their malformed rows."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.sources import SourceError, load_matrix
from raysweep.wordvectors import is_word_vector_file, read_word_vectors

GLOVE_TEXT = (
    b"the 0.1 0.2 0.3\n"
    b"new york 1 2 3\n"  # a token with a space
    b"a\xc2\xa0b 4 5 6\n"  # NBSP inside the token
    b"tab\there 7 8 9\n"  # a tab inside the token
    b"short 1 2\n"  # too few fields: malformed
    b"bad 1 x 3\n"  # not a number: malformed
    b"\n"  # blank: ignored
    b" 0.5 0.5 0.5\n"  # empty token: malformed
    b"caf\xc3 1 1 1\n"  # not valid UTF-8: kept
    b"1999 2 2 2\n"  # a numeric token
    b"crlf 3 3 3 \r\n"  # trailing space and CRLF
)


def test_glove_rules(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_bytes(GLOVE_TEXT)

    vectors = read_word_vectors(path)

    assert vectors.format == "glove-text"
    assert vectors.tokens == ["the", "new york", "a\u00a0b", "tab\there", "caf\\xc3", "1999", "crlf"]
    assert vectors.malformed_rows == 3
    assert vectors.undecodable_tokens == 1
    assert vectors.header_rows is None
    assert vectors.matrix.dtype == np.float32
    assert vectors.matrix.shape == (7, 3)
    assert vectors.matrix[1].tolist() == [1, 2, 3]
    assert vectors.matrix[6].tolist() == [3, 3, 3]


def test_glove_dimension_is_the_common_count(tmp_path):
    path = tmp_path / "glove.txt"
    # The first line is short; the dimension comes from the majority of lines.
    path.write_bytes(b"odd 1 2\n" + b"".join(b"w%d 1 2 3 4\n" % index for index in range(5)))
    vectors = read_word_vectors(path)
    assert vectors.matrix.shape == (5, 4)
    assert vectors.malformed_rows == 1


def test_fasttext_header_mismatch_warned(tmp_path, caplog):
    path = tmp_path / "crawl.vec"
    path.write_bytes(
        b"5 3\n"
        b", 0.1 0.2 0.3 \n"
        b"hello world 1 2 3 \n"
        b"x 1 2 3 \n"
        b"y 1 2 \n"  # short: malformed
        b"z 1 2 3 4 \n"  # the last 3 fields are the vector, so the token is "z 1"
        b"w 9 9 9 \n"
    )

    with caplog.at_level(logging.WARNING, logger="raysweep.wordvectors"):
        vectors = read_word_vectors(path)

    assert vectors.format == "fasttext-text"
    assert vectors.tokens == [",", "hello world", "x", "z 1", "w"]
    assert vectors.matrix[3].tolist() == [2, 3, 4]
    assert vectors.malformed_rows == 1
    assert vectors.header_rows == 5
    assert "the header states 5 rows, but the file has 5 valid and 1 malformed rows" in caplog.text


def word2vec_binary(rows: list[tuple[bytes, list[float]]], count: int, dim: int, tail: bytes = b"") -> bytes:
    data = b"%d %d\n" % (count, dim)
    for token, vector in rows:
        data += token + b" " + np.asarray(vector, dtype="<f4").tobytes() + b"\n"
    return data + tail


def test_word2vec_binary_rules(tmp_path, caplog):
    rows = [
        (b"cat", [1.0, 2.0, 3.0]),
        (b"a\xc2\xa0b", [4.0, 5.0, 6.0]),
        (b"t\tb", [7.0, 8.0, 9.0]),
        (b"caf\xc3", [0.5, 0.25, 0.125]),  # cut inside a two-byte UTF-8 sequence
    ]
    truncated = b"dog " + np.asarray([1.0, 2.0], dtype="<f4").tobytes()
    path = tmp_path / "GoogleNews-vectors.bin"
    path.write_bytes(word2vec_binary(rows, 4, 3, truncated))

    with caplog.at_level(logging.WARNING, logger="raysweep.wordvectors"):
        vectors = read_word_vectors(path)

    assert vectors.format == "word2vec-binary"
    assert vectors.tokens == ["cat", "a\u00a0b", "t\tb", "caf\\xc3"]
    assert vectors.matrix.tolist() == [vector for _, vector in rows]
    assert vectors.malformed_rows == 1
    assert vectors.undecodable_tokens == 1
    assert vectors.header_rows == 4
    assert "the header states 4 rows, but the file has 4 valid and 1 malformed rows" in caplog.text


def test_word2vec_rows_without_newlines(tmp_path):
    # Some writers put no newline after each vector.
    data = b"2 2\n" + b"a " + np.asarray([1, 2], "<f4").tobytes() + b"b " + np.asarray([3, 4], "<f4").tobytes()
    path = tmp_path / "vectors.bin"
    path.write_bytes(data)
    vectors = read_word_vectors(path)
    assert vectors.tokens == ["a", "b"]
    assert vectors.matrix.tolist() == [[1, 2], [3, 4]]
    assert vectors.malformed_rows == 0


def test_gzip_files(tmp_path):
    path = tmp_path / "glove.txt.gz"
    path.write_bytes(gzip.compress(GLOVE_TEXT))
    binary = tmp_path / "vectors.bin.gz"
    binary.write_bytes(gzip.compress(word2vec_binary([(b"x", [1.0])], 1, 1)))
    assert read_word_vectors(path).tokens[:2] == ["the", "new york"]
    assert read_word_vectors(binary).tokens == ["x"]


def test_torch_bin_is_not_word2vec(tmp_path):
    import torch

    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    assert not is_word_vector_file(tmp_path / "pytorch_model.bin")
    binary = tmp_path / "vectors.bin"
    binary.write_bytes(word2vec_binary([(b"x", [1.0])], 1, 1))
    assert is_word_vector_file(binary)


def test_no_valid_rows_is_an_error(tmp_path):
    path = tmp_path / "empty.vec"
    path.write_bytes(b"2 300\nshort 1 2\n")
    with pytest.raises(SourceError, match=r"no valid fasttext-text rows \(1 malformed\)"):
        load_matrix(str(path))


def random_rows(count: int, dim: int) -> list[np.ndarray]:
    return list(np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32))


def text_rows(vectors: list[np.ndarray], tokens: list[str]) -> bytes:
    return b"".join(
        token.encode() + b" " + " ".join(f"{value:.6f}" for value in vector).encode() + b"\n"
        for token, vector in zip(tokens, vectors)
    )


@pytest.mark.parametrize("kind", ["glove", "fasttext", "word2vec"])
def test_estimate_on_word_vector_files(tmp_path, kind):
    vectors = random_rows(60, 4)
    tokens = [f"w{index}" for index in range(58)] + ["two words", "nb\u00a0sp"]
    if kind == "glove":
        path = tmp_path / "glove.6B.4d.txt"
        path.write_bytes(text_rows(vectors, tokens) + b"broken 1 2\n")
    elif kind == "fasttext":
        path = tmp_path / "wiki.vec"
        path.write_bytes(b"100 4\n" + text_rows(vectors, tokens) + b"broken 1 2\n")
    else:
        path = tmp_path / "vectors.bin"
        rows = [(token.replace(" ", "_").encode(), vector.tolist()) for token, vector in zip(tokens, vectors)]
        path.write_bytes(word2vec_binary(rows, 60, 4, b"broken " + b"\x00" * 8))

    result = CliRunner().invoke(app, ["estimate", str(path), "--json", "--k", "5"])

    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["status"] == "ok"
    assert row["rows_in_matrix"] == 60
    assert row["rows_used"] == 60
    assert row["malformed_rows"] == 1
    assert row["row_policy"] == "all"
    assert row["tokenizer_rows"] is None
    assert row["weights_format"] == {"glove": "glove-text", "fasttext": "fasttext-text",
                                     "word2vec": "word2vec-binary"}[kind]
    assert row["hidden_size"] == 4
    assert row["id_mle"] > 0
