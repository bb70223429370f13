"""torch zip checkpoints: the restricted unpickler, storage ranges, and rejection of pickled code."""

from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.formats import decode_tensor, local_reader
from raysweep.sources import SourceError, load_local
from raysweep.torchbin import UnsafePickleError, locate_torch_bin, unpickle_state


class RunsCommand:
    """Pickles as a call to os.system, as a malicious checkpoint would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def write_malicious_bin(path: Path, marker: Path) -> None:
    """Write a real torch.save zip whose pickle would create `marker` if unpickled by pickle.load."""
    state = collections.OrderedDict(
        [("gpt_neox.embed_in.weight", torch.zeros(4, 3)), ("payload", RunsCommand(f"touch {marker}"))]
    )
    torch.save(state, path)


def read_tensor(path: Path, key: str | None = None, matrix: str = "input") -> torch.Tensor:
    read, size = local_reader(path)
    location = locate_torch_bin(read, size, matrix, key, str(path))
    return decode_tensor(location, bytearray(read(location.start, location.stop)))


def test_system_call_rejected_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    write_malicious_bin(path, marker)

    with pytest.raises(SourceError, match=r"weights-only torch checkpoint: .*references posix\.system.*nothing"):
        load_local(path)
    assert not marker.exists()


def test_eval_rejected(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"gpt_neox.embed_in.weight": torch.zeros(4, 3), "payload": CallsEval()}, path)
    with pytest.raises(SourceError, match=r"references (__builtin__|builtins)\.eval"):
        load_local(path)


@pytest.mark.parametrize(
    ("module", "name"),
    [("torch", "load"), ("torch.nn.modules.linear", "Linear"), ("numpy.core.multiarray", "_reconstruct"),
     ("builtins", "getattr"), ("collections", "defaultdict")],
)
def test_globals_outside_tensor_rebuilding_rejected(module, name):
    data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b").\x00"
    with pytest.raises(UnsafePickleError, match=f"references {module}.{name}"):
        unpickle_state(data)


def test_non_storage_persistent_id_rejected():
    data = pickle.dumps(("module", "object"), protocol=2)
    payload = b"\x80\x02" + data[2:-1] + b"Q."  # BINPERSID on the tuple
    with pytest.raises(UnsafePickleError, match="persistent id"):
        unpickle_state(payload)


def test_top_level_list_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save([torch.zeros(2, 2)], path)
    with pytest.raises(SourceError, match="expected a state dict"):
        load_local(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_read_exactly(tmp_path, dtype):
    weights = torch.randn(37, 5).to(dtype)
    torch.save({"model.embed_tokens.weight": weights, "lm_head.weight": torch.randn(37, 5).to(dtype)},
               tmp_path / "w.bin")
    assert torch.equal(read_tensor(tmp_path / "w.bin"), weights)


def test_shared_storage_view_reads_its_slice(tmp_path):
    base = torch.randn(10, 4)
    torch.save({"other": base, "transformer.wte.weight": base[3:8]}, tmp_path / "w.bin")
    read, size = local_reader(tmp_path / "w.bin")
    location = locate_torch_bin(read, size, "input", None, "w.bin")
    assert location.crc32 is None  # a slice of a record cannot be checked against the record's CRC
    assert location.nbytes == 5 * 4 * 4
    assert torch.equal(read_tensor(tmp_path / "w.bin"), base[3:8])


def test_transposed_tensor(tmp_path):
    base = torch.randn(4, 9)
    torch.save({"transformer.wte.weight": base.t()}, tmp_path / "w.bin")
    tensor = read_tensor(tmp_path / "w.bin")
    assert tensor.shape == (9, 4)
    assert torch.equal(tensor, base.t())


def test_parameters_and_metadata(tmp_path):
    layer = torch.nn.Embedding(12, 3)
    state = {"transformer.wte.weight": torch.nn.Parameter(layer.weight.detach().clone())}
    model_state = layer.state_dict()  # carries a _metadata attribute, pickled with BUILD
    model_state.update(state)
    torch.save(model_state, tmp_path / "w.bin")
    assert torch.equal(read_tensor(tmp_path / "w.bin"), layer.weight.detach())


def test_legacy_format_rejected(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(SourceError, match="not a zip-format torch checkpoint"):
        load_local(path)


def test_big_endian_record_swapped(tmp_path):
    weights = torch.randn(6, 3)
    path = tmp_path / "w.bin"
    torch.save({"transformer.wte.weight": weights}, path)
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = weights.numpy().astype(">f4").tobytes()
            target.writestr(info.filename, data)
    assert torch.equal(read_tensor(big), weights)


def test_estimate_rejects_unsafe_bin(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    write_malicious_bin(path, marker)

    result = CliRunner().invoke(app, ["estimate", str(path), "--json", "--k", "2"])

    assert result.exit_code == 1
    row = json.loads(result.stdout)
    assert row["status"] == "failed"
    assert "posix.system" in row["error"]
    assert not marker.exists()
