"""An exponential moving average of the generator's weights, the copy that gets exported.

GAN generators oscillate around a good solution from step to step; averaging their weights over the last
~1/(1 - decay) steps gives a steadier, usually sharper and more varied generator (Karras et al. 2018,
Yazici et al. 2019). Buffers (batch-norm running statistics) are copied from the live generator.
The decay warms up as min(decay, (1 + t) / (10 + t)) so that short runs are not averaged with their
random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA:
    def __init__(self, generator: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # One fused update for all weights (a launch per tensor would cost more than the arithmetic on a GPU).
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in generator.parameters()], 1 - decay)
        for ema_b, b in zip(self.model.buffers(), generator.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
