"""Copy the calibration artifacts a job needs on the embedded model into ``kvbench/shipped/`` (package data).

The main job (``make run``) uses DynaKV's gates at budget 0.06 and at ``dynakv+snapkv``'s share of it. On a fresh
clone they would be trained first (an α search: several short training runs), so they are shipped. This script
builds what is missing in the user cache (as a first ``run`` would), then, with fresh method instances, records
which artifacts a prefill at each budget loads (for DynaKV: the α-search record and the chosen α's gates, not the
basis or the other probes) and copies exactly those, unchanged (float32: the shipped gates are the trained ones,
so a run on them gives the rows a run that trained them gives). A shipped artifact is checked like any other on
load (model and data fingerprints, settings, tensor shapes), so a stale copy is ignored with one line.

    python scripts/ship_artifacts.py --methods dynakv,snapkv,dynakv+snapkv --budget 0.06
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from kvbench import artifacts
from kvbench.models import DEFAULT_MODEL, cache_dir, resolve
from kvbench.runner import load_prepared
from kvbench.spec import parse_spec, split_spec_list

SHIPPED = Path(artifacts.__file__).parent / "shipped"


def used_at(specs: list[str], budgets: list[float], model_name: str) -> list[Path]:
    """The artifacts that preparing ``specs`` and entering their prefill at each budget loads (or builds)."""
    methods = [parse_spec(text) for text in specs]
    model, _ = load_prepared(resolve(model_name), "cpu", torch.float32, "sdpa", methods)
    for spec in methods:
        for budget in budgets:
            with spec.method.prefill_context(model, budget):
                pass
    return list(dict.fromkeys(artifacts.USED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--methods", default="dynakv,snapkv,dynakv+snapkv")
    parser.add_argument("--budget", default="0.06")
    args = parser.parse_args()
    specs, budgets = split_spec_list(args.methods), [float(b) for b in args.budget.split(",")]
    used_at(specs, budgets, args.model)  # build what is missing
    artifacts.USED.clear()
    needed = used_at(specs, budgets, args.model)
    for path in needed:
        if SHIPPED in path.parents:
            print(f"already shipped: {path.relative_to(SHIPPED)}")
            continue
        target = SHIPPED / path.relative_to(cache_dir())
        target.parent.mkdir(parents=True, exist_ok=True)
        for name in ("artifact.pt", "meta.json"):
            shutil.copyfile(path.parent / name, target.parent / name)
        print(f"shipped {target.relative_to(SHIPPED.parent.parent)} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
