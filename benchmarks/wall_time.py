"""Where a run's wall time went: calibration artifacts built during it, its cells (prefill and decoding as each
row measured them), and the rest (loading the model, preparing the samples, per-cell bookkeeping, the report).

    python benchmarks/wall_time.py results/<run-id> --cache ~/.cache/kvbench --wall 612.3
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from kvbench.results import read_rows, result_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--cache", type=Path, required=True, help="the KVBENCH_CACHE the run used")
    parser.add_argument("--wall", type=float, required=True, help="the run's measured wall time in seconds")
    args = parser.parse_args()
    started = datetime.fromisoformat(json.loads((args.run_dir / "run.json").read_text())["started"])
    built: dict[str, float] = defaultdict(float)
    for meta_file in sorted((args.cache / "calibration").glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        created = datetime.fromisoformat(meta["created"].replace("Z", "+00:00"))
        if created >= started:
            built[meta["kind"]] += float(meta.get("calibration_s", 0.0))
    cells: dict[str, list[float]] = defaultdict(list)
    for path in result_files(args.run_dir):
        for row in read_rows(path):
            if row.get("status") == "ok":
                cells[row["method"]].append(row["prefill_s"] + row["decode_s"])
    lines = [f"{'part':<40} {'seconds':>9} {'share':>6}"]
    accounted = 0.0
    for kind, seconds in built.items():
        lines.append(f"{'artifact ' + kind:<40} {seconds:>9.1f} {seconds / args.wall:>6.0%}")
        accounted += seconds
    for method, times in sorted(cells.items()):
        total = sum(times)
        lines.append(f"{f'cells {method} ({len(times)}, {total / len(times):.1f} s each)':<40} {total:>9.1f} "
                     f"{total / args.wall:>6.0%}")
        accounted += total
    rest = args.wall - accounted
    lines.append(f"{'rest (load, samples, bookkeeping, report)':<40} {rest:>9.1f} {rest / args.wall:>6.0%}")
    lines.append(f"{'wall':<40} {args.wall:>9.1f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
