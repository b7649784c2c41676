"""Command line: ``python -m kvbench run|bench|calibrate|list|report``.

Every user mistake is caught before a model loads and reported as one line with exit status 2. Options that
several commands share are defined once, in parent parsers. Importing this module loads nothing heavy, so
``--help`` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kvbench import commands
from kvbench.checks import UsageError, short
from kvbench.models import DEFAULT_MODEL, DEVICE_MAPS
from kvbench.registry import RegistryError

DEFAULT_LENGTHS = "1000,2000,4000"
EXECUTORS = ("serial", "ray")
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"

METHODS_HELP = """\
method specs, comma-separated: name[:option=value,...]; e.g. snapkv:window=64,kernel=5,knorm
is snapkv with two options, then knorm (a comma-separated key=value piece continues the options
of the spec before it). 'a+b' composes a token method with a dimension method, e.g. dynakv+snapkv.
'python -m kvbench list' shows every method and its options."""

TASKS_HELP = """\
comma-separated tasks (default: niah). A task family takes a subtask list after a colon:
longbench:hotpotqa,trec,ruler:niah_single_1 runs two LongBench tasks and one RULER task (a
comma-separated piece that is not a task name continues the subtasks of the family before it).
longbench alone = its 16 English tasks; longbench:zh, longbench:e (LongBench-E), longbench:all.
lm-eval:<task or group> runs an lm-eval task with its prompts and metrics (pip install
'kvbench[lm-eval]'), e.g. lm-eval:arc_easy,hellaswag.
'python -m kvbench list' shows every task and its subtasks."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        command = self.prog.split()[-1]
        hint = "python -m kvbench --help" if command == "kvbench" else f"python -m kvbench {command} --help"
        message = _QUOTED.sub(lambda quoted: repr(short(quoted.group(1))), message)  # argparse quotes the values
        raise UsageError(f"{short(message, 300)} (see: {hint})")


_QUOTED = re.compile(r"'([^']{81,})'")
LONGEST_MESSAGE = 1000  # the longest list of valid names is about 600 characters


def _one_line(error: Exception) -> str:
    """The message as one line of bounded length, whatever a check or plugin put in it."""
    return short(str(error).strip(), LONGEST_MESSAGE)


def _model_options() -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
    parent.add_argument("--model", default=DEFAULT_MODEL,
                        help="model alias (see 'list'; random:<config> has real shapes and random weights), "
                             "Hugging Face id or local path")
    parent.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parent.add_argument("--dtype", default="auto",
                        help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16")
    parent.add_argument("--attn-implementation", default="sdpa", help="attention kernel under kvbench's hook")
    return parent


def _output_options(run_id_help: str) -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
    parent.add_argument("--results-dir", type=Path, default=Path("results"), help="where run folders are written")
    parent.add_argument("--reports-dir", type=Path, default=Path("reports"), help="where reports are written")
    parent.add_argument("--run-id", default=None, help=run_id_help)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kvbench", description="Benchmark KV-cache compression methods head to head.")
    subcommands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model = _model_options()

    run = subcommands.add_parser(
        "run", help="evaluate methods x budgets x tasks; resumable", parents=[model, _output_options(
            "name of the run (letters, digits, '._-'); reusing one resumes it")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--methods", required=True, help=METHODS_HELP)
    run.add_argument("--budget", default="0.25,0.1",
                     help="fractions of the full KV-cache bytes to keep, comma-separated, each in (0, 1]")
    run.add_argument("--tasks", default="niah", help=TASKS_HELP)
    run.add_argument("--data-dir", default=None,
                     help="folder with task data files, e.g. LongBench's official <task>.jsonl files")
    run.add_argument("--include-path", default=None, metavar="DIR",
                     help="folder of lm-eval task YAMLs of your own, run as --tasks lm-eval:<task or group>")
    run.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="truncate real documents (LongBench) in the middle to this many prompt tokens "
                          "(default: the model's context minus 500, LongBench's rule)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-samples", type=int, default=None,
                     help="cap on samples per task; LongBench: the first N rows of each dataset; RULER and "
                          "perplexity: samples per subtask and length (default 3 and 2)")
    run.add_argument("--lengths", default=DEFAULT_LENGTHS,
                     help=f"context lengths in tokens for synthetic tasks (default {DEFAULT_LENGTHS})")
    run.add_argument("--depths", default=DEFAULT_DEPTHS,
                     help=f"needle depths, fractions of the context (default {DEFAULT_DEPTHS})")
    run.add_argument("--query-aware", action="store_true",
                     help="compress the prompt with the question in it (SnapKV's setting; default)")
    run.add_argument("--query-agnostic", action="store_true",
                     help="compress the context, then append the question (kvpress's setting)")
    run.add_argument("--no-reference", action="store_true", help="do not add the 'full' reference method")
    run.add_argument("--retry-errors", action="store_true", help="on resume, run failed cells again")
    run.add_argument("--calibration-data", default=None, metavar="FILE",
                     help="calibration text for dimension methods (.txt, or .jsonl with a 'text' field); "
                          "default: SQuAD articles no task uses")
    scale = run.add_argument_group("scale-out (docs/scale-out.md)")
    scale.add_argument("--shard", default=None, metavar="I/N",
                       help="run part I of N of the grid (0 <= I < N) into results-I-of-N.jsonl; default: from "
                            "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT and torchrun's RANK/WORLD_SIZE")
    scale.add_argument("--executor", choices=EXECUTORS, default="serial",
                       help="serial (this process) or ray (Ray actors evaluate, this process writes)")
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster to use (default: RAY_ADDRESS, else a local one)")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray actors (default: one per GPU of the cluster; on CPU, one)")
    scale.add_argument("--device-map", choices=DEVICE_MAPS, default=None,
                       help="spread the model over this machine's GPUs with accelerate (models larger than one GPU)")

    calibrate = subcommands.add_parser("calibrate", parents=[model],
                                       help="fit a method's calibration artifact (dimension methods)")
    calibrate.add_argument("method", help="method spec, e.g. palu or dynakv:calibration_tokens=8192")
    calibrate.add_argument("--calibration-data", default=None, metavar="FILE",
                           help="calibration text (.txt, or .jsonl with a 'text' field); default: SQuAD articles")
    calibrate.add_argument("--force", action="store_true", help="recalibrate even when a valid artifact exists")

    listing = subcommands.add_parser("list", help="list methods, tasks and model aliases")
    listing.add_argument("--data-dir", default=None, help="also look for task data files here")

    report = subcommands.add_parser("report", help="write report.md and report.html from results directories")
    report.add_argument("run_dirs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, default=None, help="output directory (default reports/<run-id>)")

    bench = subcommands.add_parser(
        "bench", help="prefill latency, decode tokens/s, KV bytes and peak memory vs full",
        parents=[model, _output_options("name of the run (a new one: bench runs are not resumed)")])
    bench.add_argument("--methods", required=True, help=METHODS_HELP + " 'full' is always measured too.")
    bench.add_argument("--budget", default="0.5,0.25,0.1", help="budgets, comma-separated, each in (0, 1]")
    bench.add_argument("--lengths", default="4000,16000,32000", help="prompt lengths in tokens (random token ids)")
    bench.add_argument("--decode-tokens", type=int, default=128, help="greedy decoding steps after prefill")
    bench.add_argument("--repeats", type=int, default=3, help="measured repeats; the report shows medians")
    bench.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up repeats per length")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompt and of 'random'")
    return parser


COMMANDS = {"run": commands.run, "bench": commands.bench, "calibrate": commands.calibrate,
            "list": commands.list_all, "report": commands.report}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, RegistryError) as error:
        print(f"kvbench: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvbench: interrupted; finished cells are saved, rerun with the same --run-id to resume",
              file=sys.stderr)
        return 130
