"""The optimisers of the registration stages, written out (constructing a ``torch.optim`` optimiser imports
``torch._dynamo``, which took longer, about 2 s, than a whole registration of a 2 mm brain): Rprop for the few
parameters of a linear stage, Adam and a convergence schedule for the velocity field of the deformable stage."""

from __future__ import annotations

import math

import torch

# Steps grow to at most this many times the first one (a flat or degenerate objective must not send the
# transform away).
RPROP_GROWTH_LIMIT = 4.0


class Adam:
    """Adam (Kingma and Ba), the same update as ``torch.optim.Adam`` with its defaults.

    Written out: see the module docstring.
    """

    def __init__(self, parameters: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.parameters = parameters
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.first = [torch.zeros_like(p) for p in parameters]
        self.second = [torch.zeros_like(p) for p in parameters]

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.steps)
        correction2 = math.sqrt(1 - beta2**self.steps)
        for parameter, first, second in zip(self.parameters, self.first, self.second):
            if parameter.grad is None:
                continue
            gradient = parameter.grad
            first.lerp_(gradient, 1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            parameter.addcdiv_(first, (second.sqrt() / correction2).add_(self.eps), value=-step_size)


class Rprop:
    """Resilient propagation (iRprop-, Igel and Huesken 2000) for the few parameters of a linear stage.

    Each parameter has its own step, which grows while its gradient keeps its sign and halves when
    the sign flips (the optimum was crossed); only the sign of the gradient is used. On the fixed
    sample set of a level the objective is deterministic, so the steps shrink geometrically around
    the optimum, and their size says how precisely it is known: the level ends once every step is
    below ``precision`` (see :meth:`converged`), usually long before its iteration budget.
    """

    def __init__(self, parameters: list[torch.Tensor], step: float, precision: float) -> None:
        self.parameters = parameters
        self.precision = precision
        self.largest = RPROP_GROWTH_LIMIT * step
        self.steps = [torch.full_like(p, step) for p in parameters]
        self.previous = [torch.zeros_like(p) for p in parameters]

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for parameter, step, previous in zip(self.parameters, self.steps, self.previous):
            if parameter.grad is None:
                continue
            gradient = parameter.grad
            agreement = gradient * previous
            step.mul_(torch.where(agreement > 0, 1.2, torch.where(agreement < 0, 0.5, 1.0)))
            step.clamp_(min=self.precision * 1e-3, max=self.largest)
            # After a sign flip, no move this time (iRprop-): the next gradient decides the direction.
            gradient = torch.where(agreement < 0, torch.zeros_like(gradient), gradient)
            parameter.sub_(gradient.sign() * step)
            previous.copy_(gradient)

    def converged(self) -> bool:
        """Every parameter's step is below the precision."""
        return all(float(step.max()) < self.precision for step in self.steps)


class Schedule:
    """Learning rate of one pyramid level, and when the level has converged.

    The rate follows a cosine from ``base_rate`` down to ``final_fraction * base_rate`` over the
    level's iteration budget. Every ``window`` iterations the mean loss of the last window is
    compared with the window before; once it improves by less than ``tolerance`` (relative to the
    loss' magnitude, at least 0.1), the rest of the decay is compressed into ``window`` more
    iterations and the level ends -- the optimiser settles with small steps instead of running the
    whole budget on a plateau (ANTs ends a level the same way, on the slope of its energy).
    """

    def __init__(self, base_rate: float, budget: int, final_fraction: float, window: int, tolerance: float) -> None:
        self.base_rate = base_rate
        self.budget = budget
        self.final_fraction = final_fraction
        self.window = window
        self.tolerance = tolerance
        self.losses: list[float] = []
        self.settle_from: int | None = None
        self.stop_at = budget

    def rate(self, iteration: int) -> float:
        if self.settle_from is None:
            progress = iteration / max(self.budget, 1)
            start_fraction = 1.0
        else:
            # Continue from the rate reached on the plateau, down to the same final rate.
            progress = (iteration - self.settle_from) / max(self.stop_at - self.settle_from, 1)
            start_fraction = self._cosine(self.settle_from / max(self.budget, 1))
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        fraction = self.final_fraction + (start_fraction - self.final_fraction) * cosine
        return self.base_rate * fraction

    def _cosine(self, progress: float) -> float:
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def converged(self, iteration: int, loss: float) -> bool:
        """Record the loss of ``iteration``; True once the level should end after it."""
        self.losses.append(loss)
        if iteration + 1 >= self.stop_at:
            return True
        window = self.window
        if self.settle_from is None and len(self.losses) >= 2 * window and len(self.losses) % window == 0:
            recent = sum(self.losses[-window:]) / window
            before = sum(self.losses[-2 * window : -window]) / window
            if before - recent < self.tolerance * max(abs(recent), 0.1):
                self.settle_from = iteration + 1
                self.stop_at = min(self.budget, iteration + 1 + window)
        return iteration + 1 >= self.stop_at
