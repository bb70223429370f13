"""Check the CUDA kernel against the CPU kernel on a Pythia-12b-shaped matrix.

One prepared command for a machine with a GPU, meant to finish in under 5
minutes on one H200-class device:

    python benchmarks/gpu_check.py                   # 50688 x 5120, k = 20
    python benchmarks/gpu_check.py --json gpu.json

It builds a float32 matrix of the Pythia-12b embedding shape (a rank-64
signal plus noise, so that neighbours are not all equidistant), then:

1. measures the device's float32 GEMM rate with TF32 off;
2. runs the exact k-NN on the GPU for every row and times it;
3. runs the CPU kernel for the first --cpu-rows rows (searching all rows)
   and checks that their neighbour distances agree with the GPU's to 1e-12;
4. reports the achieved rate as a fraction of the measured GEMM rate. The
   CUDA path computes the full product, 2 n^2 d flops.

`--allow-cpu` runs the same steps with the "topk" method on the CPU, to
check the script itself on a machine without a GPU (use small --rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def build_matrix(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, 64, generator=generator) @ torch.randn(64, dim, generator=generator)
    noise = 0.1 * torch.randn(rows, dim, generator=generator)
    return (signal / 8 + noise).to(torch.float32)


def gemm_rate(device: torch.device) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 5120, device=device)
    b = torch.randn(8192, 5120, device=device)
    out = torch.empty(8192, 8192, device=device)
    torch.mm(a, b.T, out=out)
    _synchronize(device)
    repeats = 10 if device.type == "cuda" else 1
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b.T, out=out)
    _synchronize(device)
    return repeats * 2 * 8192 * 8192 * 5120 / (time.perf_counter() - started) / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    from raysweep import kernel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50688)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--cpu-rows", type=int, default=1024, help="rows checked against the CPU kernel")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU, to test the script")
    parser.add_argument("--json", help="write the report to this file")
    options = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    elif options.allow_cpu:
        device, name = torch.device("cpu"), "cpu (no GPU; script check only)"
    else:
        print("no CUDA device: run this on a GPU machine, or pass --allow-cpu to test the script")
        return 2

    matrix = build_matrix(options.rows, options.dim, seed=0)
    centred = kernel.centre(matrix)
    rate = gemm_rate(device)

    on_device = centred.to(device)
    kernel.nearest_neighbours(on_device[:2048], options.k, method="topk")  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    gpu = kernel.nearest_neighbours(on_device, options.k, method="topk")
    _synchronize(device)
    gpu_seconds = time.perf_counter() - started

    started = time.perf_counter()
    cpu = kernel.nearest_neighbours(centred, options.k, query_start=0, query_stop=options.cpu_rows)
    cpu_seconds = time.perf_counter() - started

    gpu_part = gpu.distances[: options.cpu_rows].cpu()
    relative = ((gpu_part - cpu.distances).abs() / cpu.distances).max().item()
    same_neighbours = (gpu.indices[: options.cpu_rows].cpu() == cpu.indices).float().mean().item()
    achieved = 2 * options.rows**2 * options.dim / gpu_seconds / 1e9

    report = {
        "device": name,
        "rows": options.rows,
        "dim": options.dim,
        "k": options.k,
        "gemm_gflops": rate,
        "gpu_seconds": gpu_seconds,
        "gpu_rescanned_rows": gpu.rescanned_rows,
        "achieved_gflops": achieved,
        "fraction_of_gemm": achieved / rate,
        "cpu_rows_checked": options.cpu_rows,
        "cpu_seconds": cpu_seconds,
        "max_relative_distance_difference": relative,
        "same_neighbour_fraction": same_neighbours,
        "agree": relative <= 1e-12,
        "torch": torch.__version__,
    }
    for name_, value in report.items():
        print(f"{name_:34s} {value}")
    if options.json:
        with open(options.json, "w") as stream:
            json.dump(report, stream, indent=2)
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
