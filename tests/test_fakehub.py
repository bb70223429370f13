"""Tests that the real huggingface_hub client works against FakeHub, and that the fixture checkpoints are real."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    HfApi,
    hf_hub_download,
    list_repo_files,
    list_repo_refs,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file

from tests.support.checkpoints import (
    CHECKPOINT_FORMATS,
    DTYPES,
    EMBEDDING_NAME,
    OUTPUT_EMBEDDING_NAME,
    publish,
    save_checkpoint,
    save_tokenizer,
    tiny_gpt_neox,
)
from tests.support.fakehub import FakeHub
from tests.support.hub_fixtures import install_fake_hub, set_offline_mode

REPO_ID = "fixture-org/pythia-tiny"
INDEX_FILES = {"sharded-bin": "pytorch_model.bin.index.json", "sharded-safetensors": "model.safetensors.index.json"}
MAIN_BYTES = bytes(range(256)) * 4
STEP_BYTES = b"step1000 weights " * 64


@pytest.fixture
def two_branch_hub(fake_hub: FakeHub) -> FakeHub:
    fake_hub.add_file(REPO_ID, "main", "model.safetensors", MAIN_BYTES)
    fake_hub.add_file(REPO_ID, "main", "config.json", b'{"model_type": "gpt_neox"}')
    fake_hub.add_file(REPO_ID, "step1000", "model.safetensors", STEP_BYTES)
    return fake_hub


def _fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send one request with urllib, bypassing proxies, and return status, headers and body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


# Downloads through hf_hub_download


def test_download_two_branches_distinct_files(two_branch_hub: FakeHub) -> None:
    main_path = hf_hub_download(REPO_ID, "model.safetensors")
    step_path = hf_hub_download(REPO_ID, "model.safetensors", revision="step1000")

    assert Path(main_path).read_bytes() == MAIN_BYTES
    assert Path(step_path).read_bytes() == STEP_BYTES
    assert main_path != step_path
    assert os.path.realpath(main_path) != os.path.realpath(step_path)
    assert Path(main_path).parent.name == two_branch_hub.commit_sha(REPO_ID, "main")
    assert Path(step_path).parent.name == two_branch_hub.commit_sha(REPO_ID, "step1000")
    assert two_branch_hub.bytes_served == len(MAIN_BYTES) + len(STEP_BYTES)
    assert two_branch_hub.bytes_served_by_path() == {
        (REPO_ID, "main", "model.safetensors"): len(MAIN_BYTES),
        (REPO_ID, "step1000", "model.safetensors"): len(STEP_BYTES),
    }


def test_download_sends_head_then_get(two_branch_hub: FakeHub) -> None:
    hf_hub_download(REPO_ID, "model.safetensors")

    requests = two_branch_hub.requests
    assert [(record.method, record.status) for record in requests] == [("HEAD", 200), ("GET", 200)]
    assert requests[0].headers["accept-encoding"] == "identity"
    assert requests[1].range is None
    assert requests[1].bytes == len(MAIN_BYTES)


def test_second_download_fetches_nothing(two_branch_hub: FakeHub) -> None:
    first_path = hf_hub_download(REPO_ID, "model.safetensors")
    two_branch_hub.reset_counters()

    second_path = hf_hub_download(REPO_ID, "model.safetensors")

    assert second_path == first_path
    assert two_branch_hub.bytes_served == 0
    assert [record.method for record in two_branch_hub.requests] == ["HEAD"]


def test_download_by_commit_sha_is_pinned(two_branch_hub: FakeHub) -> None:
    old_sha = two_branch_hub.commit_sha(REPO_ID, "main")
    new_sha = two_branch_hub.add_file(REPO_ID, "main", "model.safetensors", b"replaced")

    pinned_path = hf_hub_download(REPO_ID, "model.safetensors", revision=old_sha)
    head_path = hf_hub_download(REPO_ID, "model.safetensors")

    assert new_sha != old_sha
    assert Path(pinned_path).read_bytes() == MAIN_BYTES
    assert Path(head_path).read_bytes() == b"replaced"
    assert (REPO_ID, old_sha, "model.safetensors") in two_branch_hub.bytes_served_by_path()


def test_offline_mode_resolves_from_cache(two_branch_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    cached_path = hf_hub_download(REPO_ID, "model.safetensors", revision="step1000")
    set_offline_mode(monkeypatch)
    two_branch_hub.reset_counters()

    offline_path = hf_hub_download(REPO_ID, "model.safetensors", revision="step1000")

    assert offline_path == cached_path
    assert two_branch_hub.requests == []
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO_ID, "config.json")
    assert two_branch_hub.requests == []


def test_hf_token_sent_as_bearer(two_branch_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_hub_download(REPO_ID, "config.json")
    assert [record.authorization for record in two_branch_hub.requests] == [None, None]

    monkeypatch.setenv("HF_TOKEN", "hf_fake_test_token")
    two_branch_hub.reset_counters()
    hf_hub_download(REPO_ID, "model.safetensors")
    list_repo_files(REPO_ID)

    authorizations = [record.authorization for record in two_branch_hub.requests]
    assert len(authorizations) == 3
    assert authorizations == ["Bearer hf_fake_test_token"] * 3


def test_lfs_and_plain_files_get_hub_etags(two_branch_hub: FakeHub) -> None:
    resolve_url = f"{two_branch_hub.endpoint}/{REPO_ID}/resolve/main"
    lfs_status, lfs_headers, _ = _fetch(f"{resolve_url}/model.safetensors", method="HEAD")
    plain_status, plain_headers, _ = _fetch(f"{resolve_url}/config.json", method="HEAD")
    config_bytes = b'{"model_type": "gpt_neox"}'

    assert lfs_status == 200
    assert lfs_headers["ETag"] == f'"{hashlib.sha256(MAIN_BYTES).hexdigest()}"'
    assert lfs_headers["X-Linked-Etag"] == lfs_headers["ETag"]
    assert lfs_headers["X-Linked-Size"] == str(len(MAIN_BYTES))
    assert lfs_headers["Content-Length"] == str(len(MAIN_BYTES))
    assert lfs_headers["Accept-Ranges"] == "bytes"
    assert lfs_headers["X-Repo-Commit"] == two_branch_hub.commit_sha(REPO_ID, "main")
    assert not [name for name in lfs_headers if name.lower().startswith("x-xet")]
    assert plain_status == 200
    git_blob_sha1 = hashlib.sha1(b"blob %d\0" % len(config_bytes) + config_bytes).hexdigest()
    assert plain_headers["ETag"] == f'"{git_blob_sha1}"'
    assert "X-Linked-Etag" not in plain_headers
    assert Path(os.path.realpath(hf_hub_download(REPO_ID, "config.json"))).name == git_blob_sha1


def test_broken_small_download_restarts_whole(two_branch_hub: FakeHub) -> None:
    two_branch_hub.drop_connection_after(REPO_ID, "main", "model.safetensors", 100)

    path = hf_hub_download(REPO_ID, "model.safetensors")

    # httpx2 yields the body in 10 MiB chunks (DOWNLOAD_CHUNK_SIZE), so the
    # 100 bytes never reach the file and the retry starts over without Range.
    assert Path(path).read_bytes() == MAIN_BYTES
    assert [(record.method, record.status, record.range, record.bytes) for record in two_branch_hub.requests] == [
        ("HEAD", 200, None, 0),
        ("GET", 200, None, 100),
        ("GET", 200, None, len(MAIN_BYTES)),
    ]
    assert two_branch_hub.bytes_served == 100 + len(MAIN_BYTES)


def test_broken_large_download_resumes_with_range(fake_hub: FakeHub) -> None:
    chunk_size = 10 * 1024 * 1024
    data = bytes(range(256)) * (chunk_size // 256 + 4096)
    fake_hub.add_file(REPO_ID, "main", "model.safetensors", data)
    fake_hub.drop_connection_after(REPO_ID, "main", "model.safetensors", chunk_size + 5000)

    path = hf_hub_download(REPO_ID, "model.safetensors")

    assert Path(path).read_bytes() == data
    assert [(record.method, record.status, record.range, record.bytes) for record in fake_hub.requests] == [
        ("HEAD", 200, None, 0),
        ("GET", 200, None, chunk_size + 5000),
        ("GET", 206, f"bytes={chunk_size}-", len(data) - chunk_size),
    ]


# Errors


@pytest.mark.parametrize(
    ("repo_id", "revision", "filename", "expected_error", "expected_code"),
    [
        ("fixture-org/missing", "main", "model.safetensors", RepositoryNotFoundError, "RepoNotFound"),
        (REPO_ID, "step9999", "model.safetensors", RevisionNotFoundError, "RevisionNotFound"),
        (REPO_ID, "step1000", "config.json", RemoteEntryNotFoundError, "EntryNotFound"),
    ],
)
def test_download_missing_raises_client_error(
    two_branch_hub: FakeHub,
    repo_id: str,
    revision: str,
    filename: str,
    expected_error: type[HfHubHTTPError],
    expected_code: str,
) -> None:
    with pytest.raises(expected_error) as raised:
        hf_hub_download(repo_id, filename, revision=revision)

    assert raised.value.response.status_code == 404
    assert raised.value.response.headers["X-Error-Code"] == expected_code
    assert two_branch_hub.bytes_served == 0


def test_missing_file_error_is_entry_not_found(two_branch_hub: FakeHub) -> None:
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "pytorch_model.bin")


def test_removed_file_is_missing(two_branch_hub: FakeHub) -> None:
    two_branch_hub.remove_file(REPO_ID, "main", "config.json")

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO_ID, "config.json")
    with pytest.raises(KeyError):
        two_branch_hub.remove_file(REPO_ID, "main", "config.json")


def test_api_missing_raises_client_error(two_branch_hub: FakeHub) -> None:
    with pytest.raises(RepositoryNotFoundError):
        model_info("fixture-org/missing")
    with pytest.raises(RevisionNotFoundError):
        model_info(REPO_ID, revision="step9999")
    with pytest.raises(RepositoryNotFoundError):
        list_repo_files("fixture-org/missing")
    with pytest.raises(RevisionNotFoundError):
        list_repo_files(REPO_ID, revision="step9999")


# Range requests


@pytest.mark.parametrize(
    ("range_header", "expected_slice"),
    [
        ("bytes=10-19", slice(10, 20)),
        ("bytes=1000-", slice(1000, None)),
        ("bytes=-7", slice(-7, None)),
        ("bytes=1020-5000", slice(1020, None)),
        ("bytes=0-0", slice(0, 1)),
    ],
)
def test_range_request_returns_slice(two_branch_hub: FakeHub, range_header: str, expected_slice: slice) -> None:
    expected = MAIN_BYTES[expected_slice]
    start = expected_slice.indices(len(MAIN_BYTES))[0]

    status, headers, body = _fetch(
        f"{two_branch_hub.endpoint}/{REPO_ID}/resolve/main/model.safetensors", {"Range": range_header}
    )

    assert status == 206
    assert body == expected
    assert headers["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{len(MAIN_BYTES)}"
    assert headers["Content-Length"] == str(len(expected))
    assert two_branch_hub.bytes_served == len(expected)
    assert two_branch_hub.bytes_served_by_path() == {(REPO_ID, "main", "model.safetensors"): len(expected)}
    assert two_branch_hub.requests[-1].range == range_header


@pytest.mark.parametrize("range_header", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range_returns_416(two_branch_hub: FakeHub, range_header: str) -> None:
    status, headers, body = _fetch(
        f"{two_branch_hub.endpoint}/{REPO_ID}/resolve/main/model.safetensors", {"Range": range_header}
    )

    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(MAIN_BYTES)}"
    assert body == b""
    assert two_branch_hub.bytes_served == 0


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-6", "bytes=9-3", "items=0-1"])
def test_ignored_range_returns_whole_file(two_branch_hub: FakeHub, range_header: str) -> None:
    status, _, body = _fetch(
        f"{two_branch_hub.endpoint}/{REPO_ID}/resolve/main/model.safetensors", {"Range": range_header}
    )

    assert status == 200
    assert body == MAIN_BYTES


# Repo API


def test_repo_api_lists_files_and_refs(fake_hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "repo" / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "repo" / "config.json").write_text("{}")
    (tmp_path / "repo" / "nested" / "deeper" / "notes.txt").write_text("notes")
    sha = fake_hub.add_directory(REPO_ID, "step2000", tmp_path / "repo")
    fake_hub.add_file(REPO_ID, "main", "README.md", b"# tiny")

    tree = list(HfApi().list_repo_tree(REPO_ID, revision="step2000"))
    refs = list_repo_refs(REPO_ID)
    info = model_info(REPO_ID, revision="step2000", files_metadata=True)

    assert list_repo_files(REPO_ID, revision="step2000") == ["config.json", "nested/deeper/notes.txt"]
    assert sorted(entry.path for entry in tree) == ["config.json", "nested"]
    assert {branch.name: branch.target_commit for branch in refs.branches} == fake_hub.branches(REPO_ID)
    assert fake_hub.branches(REPO_ID)["step2000"] == sha
    assert info.sha == sha
    assert [(sibling.rfilename, sibling.size) for sibling in info.siblings] == [
        ("config.json", 2),
        ("nested/deeper/notes.txt", 5),
    ]
    paths_info = HfApi().get_paths_info(REPO_ID, ["nested", "config.json", "absent"], revision="step2000")
    assert [entry.path for entry in paths_info] == ["nested", "config.json"]


def test_special_branch_and_path_names(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO_ID, "exp/v2", "nested dir/file name+1.txt", b"special")

    path = hf_hub_download(REPO_ID, "nested dir/file name+1.txt", revision="exp/v2")

    assert Path(path).read_bytes() == b"special"
    assert fake_hub.requests[-1].path == f"/{REPO_ID}/resolve/exp%2Fv2/nested%20dir/file%20name%2B1.txt"
    assert list_repo_files(REPO_ID, revision="exp/v2") == ["nested dir/file name+1.txt"]


def test_tree_of_subdirectory(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO_ID, "main", "a/b/c.txt", b"c")
    fake_hub.add_file(REPO_ID, "main", "a/d.txt", b"d")
    api = HfApi()

    shallow = [entry.path for entry in api.list_repo_tree(REPO_ID, "a")]
    deep = [entry.path for entry in api.list_repo_tree(REPO_ID, "a", recursive=True)]

    assert shallow == ["a/b", "a/d.txt"]
    assert deep == ["a/b", "a/b/c.txt", "a/d.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(REPO_ID, "absent"))


def test_snapshot_download_fetches_checkpoint(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = tiny_gpt_neox(seed=3)
    names = save_checkpoint(model, tmp_path / "checkpoint", "sharded-safetensors")
    publish(fake_hub, REPO_ID, "step3000", tmp_path / "checkpoint")

    snapshot = Path(snapshot_download(REPO_ID, revision="step3000"))

    assert sorted(path.name for path in snapshot.iterdir()) == names
    for name in names:
        assert (snapshot / name).read_bytes() == (tmp_path / "checkpoint" / name).read_bytes()


@pytest.mark.parametrize("format", CHECKPOINT_FORMATS)
def test_transformers_loads_published_checkpoint(fake_hub: FakeHub, tmp_path: Path, format: str) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_gpt_neox(seed=4)
    names = save_checkpoint(model, tmp_path, format, dtype="float16")
    publish(fake_hub, REPO_ID, "step4000", tmp_path)
    weight_files = [name for name in names if name.endswith((".bin", ".safetensors"))]

    loaded = AutoModelForCausalLM.from_pretrained(REPO_ID, revision="step4000")

    assert loaded.dtype == torch.float16
    assert torch.equal(loaded.gpt_neox.embed_in.weight, model.gpt_neox.embed_in.weight.half())
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight.half())
    # transformers 5 resolves the branch with the repo info API, then downloads by commit sha.
    sha = fake_hub.commit_sha(REPO_ID, "step4000")
    assert any(key[1] == sha for key in fake_hub.bytes_served_by_path())
    assert fake_hub.bytes_served_for_file(REPO_ID, "config.json", "step4000") > 0
    assert fake_hub.bytes_served_for_file(REPO_ID, "config.json", "main") == 0
    for name in weight_files:
        assert fake_hub.bytes_served_for_file(REPO_ID, name, "step4000") == (tmp_path / name).stat().st_size, name


# Lifecycle


def test_cdn_redirect_drops_authorization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(cdn_redirects=True) as hub:
        install_fake_hub(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        monkeypatch.setenv("HF_TOKEN", "hf_fake_test_token")
        hub.add_file(REPO_ID, "main", "model.safetensors", MAIN_BYTES)

        path = hf_hub_download(REPO_ID, "model.safetensors")
        requests = hub.requests

    assert Path(path).read_bytes() == MAIN_BYTES
    assert [(record.origin, record.method, record.status) for record in requests] == [
        ("hub", "HEAD", 302),
        ("cdn", "GET", 200),
    ]
    assert requests[0].authorization == "Bearer hf_fake_test_token"
    assert requests[1].authorization is None
    assert hub.bytes_served_by_path() == {(REPO_ID, "main", "model.safetensors"): len(MAIN_BYTES)}


def test_stop_closes_keepalive_connections() -> None:
    hub = FakeHub().start()
    hub.add_file(REPO_ID, "main", "config.json", b"{}")
    port = int(hub.endpoint.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", f"/{REPO_ID}/resolve/main/config.json")
    assert connection.getresponse().read() == b"{}"

    started = time.monotonic()
    hub.stop()
    hub.stop()

    assert time.monotonic() - started < 2
    assert not [thread for thread in threading.enumerate() if thread.name.startswith(f"FakeHub-hub-{port}")]
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/")
    connection.close()


def test_endpoint_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        FakeHub().endpoint


# Fixture checkpoints


def _expected_tensors(model: torch.nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """Return the model's tensors under their GPT-NeoX on-disk names, converted to ``dtype``."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        disk_name = OUTPUT_EMBEDDING_NAME if name == "lm_head.weight" else name
        tensors[disk_name] = tensor.to(DTYPES[dtype])
    return tensors


def _load_checkpoint(directory: Path, format: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load all tensors of a checkpoint and return them with the weight files in load order."""
    if format == "safetensors":
        files = ["model.safetensors"]
    elif format == "bin":
        files = ["pytorch_model.bin"]
    else:
        index = json.loads((directory / INDEX_FILES[format]).read_text())
        files = sorted(set(index["weight_map"].values()))

    tensors = {}
    for name in files:
        if name.endswith(".safetensors"):
            tensors.update(load_file(directory / name))
        else:
            tensors.update(torch.load(directory / name, map_location="cpu", weights_only=True))
    return tensors, files


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("format", CHECKPOINT_FORMATS)
def test_checkpoint_loads_model_tensors(tmp_path: Path, format: str, dtype: str) -> None:
    model = tiny_gpt_neox(seed=7)
    expected = _expected_tensors(model, dtype)

    names = save_checkpoint(model, tmp_path, format, dtype=dtype)
    tensors, weight_files = _load_checkpoint(tmp_path, format)

    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name
    assert "config.json" in names
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    assert set(weight_files) <= set(names)
    assert model.gpt_neox.embed_in.weight.dtype == torch.float32


@pytest.mark.parametrize("format", ["sharded-bin", "sharded-safetensors"])
def test_sharded_checkpoint_embedding_first(tmp_path: Path, format: str) -> None:
    model = tiny_gpt_neox(seed=1)

    names = save_checkpoint(model, tmp_path, format)
    index_name = INDEX_FILES[format]
    index = json.loads((tmp_path / index_name).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    tensors, _ = _load_checkpoint(tmp_path, format)

    assert len(shard_files) >= 2
    assert shard_files[0].endswith(f"-00001-of-{len(shard_files):05d}{Path(shard_files[0]).suffix}")
    assert index["weight_map"][EMBEDDING_NAME] == shard_files[0]
    assert index["metadata"]["total_size"] == sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    assert set(shard_files) | {index_name, "config.json"} <= set(names)


def test_sharded_bin_shard_contains_embedding(tmp_path: Path) -> None:
    model = tiny_gpt_neox(seed=1)
    names = save_checkpoint(model, tmp_path, "sharded-bin")
    first_shard_name = next(name for name in names if name.startswith("pytorch_model-00001-of-"))

    first_shard = torch.load(tmp_path / first_shard_name, map_location="cpu", weights_only=True)

    assert next(iter(first_shard)) == EMBEDDING_NAME
    assert torch.equal(first_shard[EMBEDDING_NAME], model.gpt_neox.embed_in.weight)


def test_tiny_gpt_neox_seeds() -> None:
    first = tiny_gpt_neox(seed=0)
    again = tiny_gpt_neox(seed=0)
    other = tiny_gpt_neox(seed=1)

    assert torch.equal(first.gpt_neox.embed_in.weight, again.gpt_neox.embed_in.weight)
    assert not torch.equal(first.gpt_neox.embed_in.weight, other.gpt_neox.embed_in.weight)
    assert first.gpt_neox.embed_in.weight.shape == (200, 32)
    assert first.config.tie_word_embeddings is False


def test_tiny_gpt_neox_keeps_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    tiny_gpt_neox(seed=5)

    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_smaller_than_embedding(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path, num_tokens=150)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    assert len(tokenizer) == 150
    assert len(tokenizer) < tiny_gpt_neox().config.vocab_size
    assert tokenizer("w0 w1 w147")["input_ids"] == [2, 3, 149]
    assert tokenizer.eos_token_id == 0
