"""The CNN trainer's optimizers: plain SGD (the paper's), and GaLore's projected Adam.

SGD receives gradients already multiplied by the step size (the trainer scales the loss
gradient once, as the MLP's BackpropTrainer does), so its step is one subtraction per array.
GaLore keeps Adam's moments in a rank-r projection of each weight matrix's gradient (peft.py);
biases, BN parameters and matrices no wider than the rank get plain Adam. Its state is what
GaLore saves memory on: 2·r·max(N, M) floats per matrix instead of 2·N·M.
"""

from __future__ import annotations

import numpy as np

from agent.trainer.cnn import peft

GALORE_UPDATE_EVERY = 200  # steps between projector refreshes (GaLore's default gap)
GALORE_SCALE = 0.25  # GaLore's α: the projected step is scaled by it


class Sgd:
    def step(self, params: dict, grads: dict) -> None:
        for name, grad in grads.items():
            params[name] -= grad  # grads arrive × the step size


class GaLoreAdam:
    def __init__(self, params: dict, *, lr: float, rank: int, update_every=GALORE_UPDATE_EVERY,
                 scale=GALORE_SCALE):  # fmt: skip
        self.lr, self.rank, self.update_every, self.scale = lr, rank, update_every, scale
        self.t = 0
        self.projected = {  # weight matrices wider than the rank in both directions
            name for name, a in params.items() if name[0] == "W" and min(a.shape) > rank
        }
        self.projectors: dict[str, tuple] = {}
        self.moments: dict[str, tuple] = {}  # name -> (m, v), shaped like what Adam sees

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        refresh = (self.t - 1) % self.update_every == 0
        for name, grad in grads.items():
            if name in self.projected:
                if refresh:
                    self.projectors[name] = peft.galore_projector(grad, self.rank)
                P, side = self.projectors[name]
                low = peft.galore_project(grad, P, side)  # (R, M) or (N, R)
                direction = peft.adam_direction(low, self._moments(name, low), self.t)
                params[name] -= (self.lr * self.scale) * peft.galore_project_back(
                    direction, P, side
                )
            else:
                params[name] -= self.lr * peft.adam_direction(
                    grad, self._moments(name, grad), self.t
                )

    def _moments(self, name, like):
        if name not in self.moments:
            self.moments[name] = (np.zeros_like(like), np.zeros_like(like))
        return self.moments[name]

    @property
    def state_floats(self) -> int:
        return sum(m.size + v.size for m, v in self.moments.values())


def make_optimizer(kind: str, params: dict, *, lr: float, rank: int):
    if kind == "sgd":
        return Sgd()
    if kind == "galore":
        return GaLoreAdam(params, lr=lr, rank=rank)
    if kind == "adam":  # GaLore with nothing projected: plain Adam
        adam = GaLoreAdam(params, lr=lr, rank=rank)
        adam.projected = set()
        return adam
    raise ValueError(f"unknown optimizer {kind!r}: sgd or galore")
