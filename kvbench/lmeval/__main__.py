"""``python -m kvbench.lmeval <lm-eval arguments>``: lm-eval's own command line, with ``--model kvbench`` registered.

lm-eval 0.4.x looks models up in its own registry only (no entry points), so ``lm_eval --model kvbench`` cannot
find kvbench; this runs the same command after importing ``kvbench.lmeval.model``, which registers it.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import kvbench.lmeval.model  # noqa: F401 - registers --model kvbench

    cli_evaluate()


if __name__ == "__main__":
    main()
