"""Estimator: hand-computed values, known manifolds, scikit-dimension, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skdim.id import MLE

from raysweep import kernel
from raysweep.estimator import (
    EstimatorSettings,
    estimate,
    local_statistics,
    partial_statistics,
    prepare,
    reduce,
)


def plane_in_16d(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    return rng.random((rows, 2)) @ basis[:2]


def flat_torus(rows: int, seed: int = 0) -> np.ndarray:
    angles = np.random.default_rng(seed).random((rows, 2)) * 2 * np.pi
    return np.column_stack([np.cos(angles[:, 0]), np.sin(angles[:, 0]),
                            np.cos(angles[:, 1]), np.sin(angles[:, 1])])


def unit_cube(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 3))


def skdim_id(x: np.ndarray, k: int) -> float:
    return float(MLE().fit(x, n_neighbors=k).dimension_)


def test_hand_computed_local_id():
    # Neighbours at 1, 3 and 7 with k = 3: LID = 2 / (ln 7 + ln 7/3) = 0.7160.
    sums, lids = local_statistics(np.array([[1.0, 3.0, 7.0]]), (3,))
    assert lids[0] == pytest.approx(2 / (math.log(7) + math.log(7 / 3)), rel=1e-15)
    assert round(lids[0], 4) == 0.7160
    assert sums[0] == pytest.approx(math.log(7) + math.log(7 / 3), rel=1e-15)


def test_hand_computed_through_pipeline():
    # On a line, the point 0 has neighbours 1, -3 and 7 at distances 1, 3, 7.
    points = np.array([[0.0], [1.0], [-3.0], [7.0]])
    result = estimate(points, EstimatorSettings(k=3))
    assert result.row_ids[0] == 0
    assert round(result.lids[0], 4) == 0.7160


@pytest.mark.parametrize(
    ("name", "data", "true_id", "tolerance"),
    [
        ("plane in 16-d", plane_in_16d(4000), 2, 0.1),
        ("flat torus in 4-d", flat_torus(4000), 2, 0.1),
        # Boundary effects bias the cube's estimate down, as for any kNN estimator.
        ("unit cube", unit_cube(5000), 3, 0.25),
    ],
)
def test_known_manifold_dimension(name, data, true_id, tolerance):
    result = estimate(data)
    assert abs(result.id_mle - true_id) < tolerance, name
    assert abs(result.id_median - true_id) < 2 * tolerance, name


@pytest.mark.parametrize("k", [5, 20])
@pytest.mark.parametrize("maker", [plane_in_16d, flat_torus, unit_cube])
def test_matches_scikit_dimension(maker, k):
    data = maker(2500, seed=3)
    ours = estimate(data, EstimatorSettings(k=k)).id_mle
    assert ours == pytest.approx(skdim_id(data, k), rel=1e-6)


def test_matches_scikit_dimension_on_gaussian():
    data = np.random.default_rng(7).standard_normal((2000, 40)).astype(np.float32)
    ours = estimate(data).id_mle
    assert ours == pytest.approx(skdim_id(data.astype(np.float64), 20), rel=1e-6)


def test_matches_float64_brute_force():
    data = np.random.default_rng(1).standard_normal((1500, 24))
    result = estimate(data, EstimatorSettings(k=10))
    distances = np.sqrt(((data[:, None, :] - data[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, :10]
    s = np.log(nearest[:, 9:10] / nearest[:, :9]).sum(axis=1)
    assert result.id_mle == pytest.approx(9 * len(data) / s.sum(), rel=1e-12)
    np.testing.assert_allclose(result.lids, 9 / s, rtol=1e-12)


def test_row_order_invariance():
    data = plane_in_16d(3000)
    order = np.random.default_rng(5).permutation(len(data))
    first = estimate(data)
    shuffled = estimate(data[order])
    assert shuffled.id_mle == pytest.approx(first.id_mle, rel=1e-12)
    assert shuffled.id_median == pytest.approx(first.id_median, rel=1e-12)
    # Per-token LIDs follow their rows.
    np.testing.assert_allclose(shuffled.lids, first.lids[order], rtol=1e-12)


@pytest.mark.parametrize("budget", [50_000, 400_000, 5_000_000])
def test_chunk_size_invariance(budget):
    data = flat_torus(3000)
    reference = estimate(data)
    chunked = estimate(data, budget_bytes=budget)
    np.testing.assert_array_equal(chunked.lids, reference.lids)
    assert chunked.id_mle == pytest.approx(reference.id_mle, rel=1e-14)


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_shards_reduce_to_single_result(shards):
    data = unit_cube(2000)
    single = estimate(data)
    sharded = estimate(data, shards=shards)
    assert sharded.id_mle == pytest.approx(single.id_mle, rel=1e-12)
    np.testing.assert_array_equal(sharded.lids, single.lids)


def test_translation_does_not_change_result():
    data = plane_in_16d(2000)
    moved = data + 1e4
    assert estimate(moved).id_mle == pytest.approx(estimate(data).id_mle, rel=1e-9)


def test_duplicated_rows_are_dropped_and_counted():
    data = unit_cube(1000)
    repeated = np.concatenate([data, data[:50], data[10:20]])
    result = estimate(repeated)
    assert result.duplicate_rows == 60
    assert result.rows_used == 1000
    assert result.rows_in_matrix == 1060
    assert math.isfinite(result.id_mle)
    assert result.id_mle > 0
    assert result.nonfinite_lid == 0
    assert result.id_mle == pytest.approx(estimate(data).id_mle, rel=1e-12)


def test_duplicate_policy_error_rejects_repeats():
    data = unit_cube(100)
    with pytest.raises(ValueError, match="3 rows repeat an earlier row"):
        prepare(np.concatenate([data, data[:3]]), EstimatorSettings(duplicates="error"))


def test_negative_zero_counts_as_duplicate():
    data = np.array([[0.0, 1.0], [-0.0, 1.0], [2.0, 3.0], [4.0, 1.0], [5.0, 5.0]])
    prepared = prepare(data, EstimatorSettings(k=2))
    assert prepared.duplicate_rows == 1


def test_nonfinite_rows_rejected_with_ids():
    data = unit_cube(100)
    data[7, 1] = np.nan
    data[42, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 rows contain NaN or inf \(rows 7, 42\)"):
        prepare(data, EstimatorSettings())


def test_k_larger_than_distinct_rows_rejected():
    data = unit_cube(12)
    with pytest.raises(ValueError, match=r"k \+ 1 = 21 exceeds the 12 distinct rows"):
        prepare(data, EstimatorSettings(k=20))
    repeated = np.concatenate([data[:5]] * 4)
    with pytest.raises(ValueError, match=r"k \+ 1 = 6 exceeds the 5 distinct rows .*15 repeats"):
        prepare(repeated, EstimatorSettings(k=5))


@pytest.mark.parametrize("k", [0, 1])
def test_k_below_two_rejected(k):
    with pytest.raises(ValueError, match="k >= 2"):
        EstimatorSettings(k=k)


def test_unknown_duplicate_policy_rejected():
    with pytest.raises(ValueError, match="duplicate policy 'keep' is unknown"):
        EstimatorSettings(duplicates="keep")


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="2-D"):
        prepare(np.zeros(10), EstimatorSettings())
    with pytest.raises(ValueError, match="numeric"):
        prepare(np.array([["a", "b"]]), EstimatorSettings())


def test_k_range_averages_over_k():
    data = flat_torus(2000)
    ranged = estimate(data, EstimatorSettings(k=12, k_min=8))
    singles = [estimate(data, EstimatorSettings(k=k)) for k in range(8, 13)]
    assert ranged.k == 12
    assert ranged.k_min == 8
    assert ranged.id_mle == pytest.approx(np.mean([s.id_mle for s in singles]), rel=1e-12)
    np.testing.assert_allclose(ranged.lids, np.mean([s.lids for s in singles], axis=0), rtol=1e-12)


def test_equidistant_neighbours_finite_global_id():
    # The origin has its 6 nearest neighbours at +-e_i, all at distance exactly 1.
    # Integer points in mirror pairs keep the mean and every distance exact.
    axes = np.concatenate([np.eye(3), -np.eye(3)])
    far = np.random.default_rng(0).integers(10, 60, (15, 3)).astype(float)
    data = np.concatenate([np.zeros((1, 3)), axes, far, -far])
    result = estimate(data, EstimatorSettings(k=6))
    assert math.isinf(result.lids[0])
    assert result.nonfinite_lid >= 1
    assert math.isfinite(result.id_mle)
    assert result.id_mle > 0
    assert math.isfinite(result.id_mean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(dtype):
    data = torch.from_numpy(plane_in_16d(1500)).to(dtype)
    result = estimate(data)
    reference = estimate(data.to(torch.float64).numpy())
    assert result.id_mle == reference.id_mle


def test_reduce_rejects_gaps_and_overlaps():
    data = unit_cube(300)
    settings = EstimatorSettings(k=5)
    prepared = prepare(data, settings)
    centred = kernel.centre(torch.from_numpy(prepared.rows))
    first = partial_statistics(centred, settings, 0, 100)
    last = partial_statistics(centred, settings, 150, 300)
    with pytest.raises(ValueError, match="from 150, expected 100"):
        reduce(prepared, settings, [first, last])
    with pytest.raises(ValueError, match="cover 100 rows, expected 300"):
        reduce(prepared, settings, [first])


def test_redundancy_is_one_minus_id_over_hidden_size():
    data = plane_in_16d(1000)
    result = estimate(data)
    assert result.hidden_size == 16
    assert result.redundancy == pytest.approx(1 - result.id_mle / 16, rel=1e-15)
