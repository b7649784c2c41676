"""Key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression", arXiv 2406.11430): keys with a low L2 norm draw high attention, so keep
the keys with the lowest norm. Needs no attention scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import LayerInputs, TokenMethod


@dataclass
class KNorm(TokenMethod):
    name: ClassVar[str] = "knorm"
    summary: ClassVar[str] = "keep the keys with the lowest L2 norm (Devoto et al. 2024)"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
