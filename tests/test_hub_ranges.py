"""Range reads of one tensor from the fake Hub: bytes served, the tensor cache, faults and access control."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers

from raysweep.sources import SourceError, SourceMissing, load_matrix
from tests.support.checkpoints import (
    CHECKPOINT_FORMATS,
    DTYPES,
    EMBEDDING_NAME,
    save_checkpoint,
    save_tokenizer,
    tiny_gpt_neox,
)
from tests.support.fakehub import FakeHub
from tests.support.hub_fixtures import install_fake_hub, set_offline_mode

REPO = "fixture-org/neox-2k"
VOCAB = 2048
HIDDEN = 64
TOKENIZER_ENTRIES = 2000
KIB = 1024


@pytest.fixture(scope="module")
def model():
    return tiny_gpt_neox(seed=0, vocab_size=VOCAB, hidden_size=HIDDEN)


def publish_checkpoint(fake_hub: FakeHub, model, directory: Path, format: str, dtype: str,
                       revision: str = "step1000", repo: str = REPO) -> list[str]:
    """Save and publish a checkpoint; sharded formats put the embedding and more in the first shard."""
    options = {}
    if format.startswith("sharded"):
        total = sum(tensor.numel() for tensor in model.state_dict().values()) * DTYPES[dtype].itemsize
        # 60 % of the checkpoint: two shards, and the first contains more than the embedding.
        options["max_shard_size"] = int(0.6 * total)
    names = save_checkpoint(model, directory, format, dtype=dtype, **options)
    save_tokenizer(directory, num_tokens=TOKENIZER_ENTRIES)
    fake_hub.add_directory(repo, revision, directory)
    return names


def served_files(fake_hub: FakeHub) -> dict[str, int]:
    return {path: count for (_, _, path), count in fake_hub.bytes_served_by_path().items() if count > 0}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("format", CHECKPOINT_FORMATS)
def test_bytes_served_within_bound(fake_hub, model, tmp_path, format, dtype, monkeypatch):
    names = publish_checkpoint(fake_hub, model, tmp_path, format, dtype)
    expected = model.gpt_neox.embed_in.weight.detach().to(DTYPES[dtype])

    loaded = load_matrix(REPO, revision="step1000")

    assert loaded.matrix.dtype == DTYPES[dtype]
    assert torch.equal(loaded.matrix, expected)
    assert loaded.tensor_key == EMBEDDING_NAME
    tensor_bytes = expected.numel() * expected.element_size()
    files = served_files(fake_hub)
    bound = 1.05 * tensor_bytes + 64 * KIB * len(files)
    assert fake_hub.bytes_served <= bound, files
    assert loaded.fetched_bytes == fake_hub.bytes_served

    weights = loaded.weights_file
    assert weights in names
    served_weights = files[weights]
    assert served_weights <= 1.05 * tensor_bytes + 64 * KIB
    # The file is larger than the bound, so a whole-file download would fail the check above.
    assert (tmp_path / weights).stat().st_size > 1.05 * tensor_bytes + 64 * KIB
    assert not [name for name in files if name.endswith((".bin", ".safetensors")) and name != weights]

    fake_hub.reset_counters()
    again = load_matrix(REPO, revision="step1000")
    assert fake_hub.bytes_served == 0
    assert again.fetched_bytes == 0
    assert {record.method for record in fake_hub.requests} <= {"HEAD"}
    assert torch.equal(again.matrix, expected)
    assert again.tensor_sha256 == loaded.tensor_sha256

    set_offline_mode(monkeypatch)
    fake_hub.reset_counters()
    offline = load_matrix(REPO, revision="step1000")
    assert fake_hub.requests == []
    assert torch.equal(offline.matrix, expected)
    assert offline.tokenizer_rows == TOKENIZER_ENTRIES
    assert offline.resolved_revision == fake_hub.commit_sha(REPO, "step1000")


@pytest.mark.parametrize("format", ["bin", "sharded-safetensors"])
def test_output_matrix_by_range(fake_hub, model, tmp_path, format):
    publish_checkpoint(fake_hub, model, tmp_path, format, "float16")
    loaded = load_matrix(REPO, revision="step1000", matrix="output")
    assert loaded.tensor_key == "embed_out.weight"
    assert torch.equal(loaded.matrix, model.get_output_embeddings().weight.detach().half())


def test_hub_tensor_equals_local_read(fake_hub, model, tmp_path):
    publish_checkpoint(fake_hub, model, tmp_path, "sharded-bin", "bfloat16")
    remote = load_matrix(REPO, revision="step1000")
    local = load_matrix(str(tmp_path))
    assert torch.equal(remote.matrix, local.matrix)
    assert remote.tensor_sha256 == local.tensor_sha256
    assert remote.tokenizer_rows == local.tokenizer_rows == TOKENIZER_ENTRIES


def test_cdn_redirect_keeps_token_on_hub(tmp_path, monkeypatch, model):
    with FakeHub(cdn_redirects=True) as cdn_hub:
        install_fake_hub(monkeypatch, cdn_hub.endpoint, tmp_path / "hf-home")
        huggingface_hub.close_session()
        monkeypatch.setenv("HF_TOKEN", "hf_fixture_token")
        publish_checkpoint(cdn_hub, model, tmp_path / "checkpoint", "safetensors", "float32")

        loaded = load_matrix(REPO, revision="step1000")
        requests = cdn_hub.requests
        served = cdn_hub.bytes_served
    huggingface_hub.close_session()

    tensor_bytes = loaded.matrix.numel() * loaded.matrix.element_size()
    assert served <= 1.05 * tensor_bytes + 2 * 64 * KIB
    cdn_gets = [record for record in requests if record.origin == "cdn"]
    assert cdn_gets
    assert all(record.range is not None for record in cdn_gets if record.file_key[2] == "model.safetensors")
    assert all(record.authorization is None for record in cdn_gets)
    assert all(record.authorization == "Bearer hf_fixture_token" for record in requests if record.origin == "hub")


def test_broken_transfer_resumes(fake_hub, model, tmp_path, caplog):
    publish_checkpoint(fake_hub, model, tmp_path, "safetensors", "float32")
    revision = "step1000"
    # The client pins the commit after its first response, so the GETs name the commit.
    fake_hub.drop_connection_after(REPO, fake_hub.commit_sha(REPO, revision), "model.safetensors", 1000)

    with caplog.at_level(logging.WARNING, logger="raysweep.hub"):
        loaded = load_matrix(REPO, revision=revision)

    assert torch.equal(loaded.matrix, model.gpt_neox.embed_in.weight.detach())
    assert "resuming" in caplog.text
    ranges = [record.range for record in fake_hub.requests
              if record.method == "GET" and record.file_key and record.file_key[2] == "model.safetensors"]
    assert ranges[0] == "bytes=0-4095"
    assert ranges[1] == "bytes=1000-4095"


def test_revisions_sharing_a_file_share_the_cached_tensor(fake_hub, model, tmp_path):
    publish_checkpoint(fake_hub, model, tmp_path, "safetensors", "float16", revision="step1000")
    fake_hub.add_directory(REPO, "step2000", tmp_path)  # the same bytes under another branch
    first = load_matrix(REPO, revision="step1000")
    fake_hub.reset_counters()

    second = load_matrix(REPO, revision="step2000")

    assert second.tensor_sha256 == first.tensor_sha256
    assert second.resolved_revision == fake_hub.commit_sha(REPO, "step2000")
    # Only the safetensors header is read again; the tensor comes from the cache.
    assert served_files(fake_hub).get("model.safetensors", 0) <= 4 * KIB


def test_corrupt_cached_tensor_is_fetched_again(fake_hub, model, tmp_path, caplog):
    publish_checkpoint(fake_hub, model, tmp_path, "safetensors", "float32")
    load_matrix(REPO, revision="step1000")
    cache_root = Path(huggingface_hub.constants.HF_HUB_CACHE)
    [cached] = list(cache_root.rglob("raysweep/tensors/*/*.safetensors"))
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    fake_hub.reset_counters()

    with caplog.at_level(logging.WARNING, logger="raysweep.hub"):
        loaded = load_matrix(REPO, revision="step1000")

    assert "sha256" in caplog.text
    assert torch.equal(loaded.matrix, model.gpt_neox.embed_in.weight.detach())
    assert loaded.fetched_bytes > 0


def test_cache_layout_in_hub_cache(fake_hub, model, tmp_path):
    publish_checkpoint(fake_hub, model, tmp_path, "bin", "float32")
    load_matrix(REPO, revision="step1000")
    folder = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--fixture-org--neox-2k"
    commit = fake_hub.commit_sha(REPO, "step1000")

    assert (folder / "refs" / "step1000").read_text() == commit
    located = json.loads((folder / "raysweep" / "located" / commit / "input.json").read_text())
    assert located["weights_file"] == "pytorch_model.bin"
    assert located["tensor_key"] == EMBEDDING_NAME
    assert (folder / "raysweep" / "tensors" / located["etag"] / f"{EMBEDDING_NAME}.safetensors").is_file()
    info = huggingface_hub.scan_cache_dir(Path(huggingface_hub.constants.HF_HUB_CACHE))
    assert not info.warnings


def test_missing_shard_is_missing(fake_hub, model, tmp_path):
    names = publish_checkpoint(fake_hub, model, tmp_path, "sharded-safetensors", "float16")
    first_shard = next(name for name in names if name.startswith("model-00001-of-"))
    fake_hub.remove_file(REPO, "step1000", first_shard)
    with pytest.raises(SourceMissing, match=f"maps 'gpt_neox.embed_in.weight' to {first_shard}"):
        load_matrix(REPO, revision="step1000")


def test_truncated_safetensors_rejected(fake_hub, model, tmp_path):
    publish_checkpoint(fake_hub, model, tmp_path, "safetensors", "float32")
    data = (tmp_path / "model.safetensors").read_bytes()
    fake_hub.add_file(REPO, "step1000", "model.safetensors", data[:-100])
    with pytest.raises(SourceError, match="truncated"):
        load_matrix(REPO, revision="step1000")


def test_corrupt_storage_record_fails_crc(fake_hub, model, tmp_path):
    publish_checkpoint(fake_hub, model, tmp_path, "bin", "float32")
    expected = model.gpt_neox.embed_in.weight.detach()
    data = bytearray((tmp_path / "pytorch_model.bin").read_bytes())
    position = bytes(data).find(expected[0].numpy().tobytes())
    assert position > 0
    data[position] ^= 0x01
    fake_hub.add_file(REPO, "step1000", "pytorch_model.bin", bytes(data))
    with pytest.raises(SourceError, match="CRC-32"):
        load_matrix(REPO, revision="step1000")


def test_gated_repo_needs_token(fake_hub, model, tmp_path, monkeypatch):
    publish_checkpoint(fake_hub, model, tmp_path, "safetensors", "float16", repo="gated-org/model")
    fake_hub.gate("gated-org/model", "hf_granted")

    with pytest.raises(SourceError, match="gated repository .* set HF_TOKEN"):
        load_matrix("gated-org/model", revision="step1000")

    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    loaded = load_matrix("gated-org/model", revision="step1000")
    assert loaded.matrix.shape == (VOCAB, HIDDEN)


def test_unsafe_bin_on_hub_fails_before_reading_tensors(fake_hub, tmp_path):
    from tests.test_torchbin import write_malicious_bin

    marker = tmp_path / "marker"
    write_malicious_bin(tmp_path / "pytorch_model.bin", marker)
    fake_hub.add_file(REPO, "main", "pytorch_model.bin", (tmp_path / "pytorch_model.bin").read_bytes())

    with pytest.raises(SourceError, match="weights-only torch checkpoint: .*posix.system"):
        load_matrix(REPO)
    assert not marker.exists()


# Modern architectures through the same readers


def tiny_llama(vocab_size: int):
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def tiny_qwen2(vocab_size: int):
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


def tiny_gpt2(vocab_size: int):
    config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    ("build", "key", "shard_size"),
    [
        (tiny_llama, "model.embed_tokens.weight", 200_000),
        (tiny_qwen2, "model.embed_tokens.weight", None),
        (tiny_gpt2, "transformer.wte.weight", None),
    ],
)
def test_modern_architectures_by_range(fake_hub, tmp_path, build, key, shard_size):
    torch.manual_seed(0)
    model = build(3000)
    model.save_pretrained(tmp_path, max_shard_size=shard_size or "50GB")
    fake_hub.add_directory("fixture-org/modern", "main", tmp_path)

    loaded = load_matrix("fixture-org/modern")

    expected = model.get_input_embeddings().weight.detach()
    assert torch.equal(loaded.matrix, expected)
    assert loaded.tensor_key == key
    tensor_bytes = expected.numel() * expected.element_size()
    assert fake_hub.bytes_served <= 1.05 * tensor_bytes + 64 * KIB * len(served_files(fake_hub))



def test_commit_revision_rerun_sends_nothing(fake_hub, model, tmp_path):
    publish_checkpoint(fake_hub, model, tmp_path, "sharded-bin", "float16")
    commit = fake_hub.commit_sha(REPO, "step1000")
    first = load_matrix(REPO, revision=commit)
    fake_hub.reset_counters()

    again = load_matrix(REPO, revision=commit)

    assert fake_hub.requests == []
    assert again.fetched_bytes == 0
    assert again.resolved_revision == commit
    assert torch.equal(again.matrix, first.matrix)
