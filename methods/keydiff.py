"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
LLM Inference in Resource-Constrained Environments", arXiv 2504.15364).

Keep the keys least similar (cosine) to the anchor, the mean of the normalised keys of the same
KV head: distinctive keys draw attention. Needs no attention scores and no queries. The paper
applies it block by block while prefilling; here, as in kvpress's KeyDiffPress, once on the whole
prompt (and every ``interval`` tokens with ``decoding=true``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.methods.base import LayerInputs, TokenMethod


@dataclass
class KeyDiff(TokenMethod):
    name: ClassVar[str] = "keydiff"
    summary: ClassVar[str] = "keep keys least cosine-similar to the mean key (Park et al. 2025)"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
