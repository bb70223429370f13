"""Measure raysweep's per-cell overhead on Ray against the compute of a real cell.

Runs a job of 154 tiny cells (one per Pythia checkpoint, a 512 x 16 random
matrix each) on a local Ray instance and reports the wall time per cell
beyond the cells' own compute time, then times one Pythia-70m-shaped cell
(a 50304 x 512 random matrix) in the same run for comparison.

    python benchmarks/cell_overhead.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

CELLS = 154


def main() -> int:
    import ray

    from raysweep import runner
    from raysweep.estimator import estimate
    from raysweep.jobs import load_job
    from raysweep.sources import load_matrix

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference", action="store_true", help="do not time the Pythia-70m-shaped cell")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        job = Path(folder) / "tiny.toml"
        sources = ", ".join(f'"random:512x16:{seed}"' for seed in range(CELLS))
        job.write_text(f'name = "tiny"\n[[sources]]\nsources = [{sources}]\n')

        ray.init(include_dashboard=False, logging_level="WARNING")
        try:
            started = time.perf_counter()
            summary = runner.run_job(load_job(str(job)), Path(folder) / "out")
            wall = time.perf_counter() - started
        finally:
            ray.shutdown()

    compute = sum(row["seconds"] for row in summary.rows)
    per_cell = (wall - compute) / CELLS
    print(f"{CELLS} tiny cells: wall {wall:.2f} s, compute inside tasks {compute:.2f} s, "
          f"overhead {per_cell * 1000:.1f} ms per cell (tasks run one at a time: each takes every CPU)")

    if not options.skip_reference:
        matrix = load_matrix("random:50304x512:0").matrix
        started = time.perf_counter()
        estimate(matrix, device="cpu")
        reference = time.perf_counter() - started
        print(f"Pythia-70m-shaped cell (50304 x 512) compute: {reference:.2f} s; "
              f"overhead per cell = {per_cell / reference:.2%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
