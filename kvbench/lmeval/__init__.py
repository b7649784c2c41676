"""Bridges between kvbench and lm-eval (EleutherAI's lm-evaluation-harness, ``pip install 'kvbench[lm-eval]'``).

- ``kvbench.lmeval.model``: kvbench as an lm-eval model (``python -m kvbench.lmeval run --model kvbench ...``);
- ``kvbench.lmeval.tasks``: lm-eval's tasks as kvbench samples (``python -m kvbench run --tasks lm-eval:<name>``).

Nothing is imported here, so naming an lm-eval task on kvbench's command line stays cheap until it is used.
"""
