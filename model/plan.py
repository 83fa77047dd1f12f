"""A training run's plan: tokens per step, steps, and the wall time they will take, known before step one.

The time per step is measured on trial steps (forward and backward on a batch of the run's shape,
no optimizer update, the gradients thrown away): the model and the data order are untouched, so a
run with a plan trains exactly as one without. With a time budget (--minutes) the step count is
chosen from that measurement before training starts, so the warmup + cosine schedule is planned
for the steps that will run; as the run goes, the remaining steps are re-fitted to the remaining
time (a shared CPU's speed drifts), the cosine with them, so it still ends on time at its floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Share of a budget kept for what is not a training step: validation passes, the checkpoint, the
# loss plot; the trial steps' timing also varies by a few percent between steps.
BUDGET_MARGIN = 0.15


@dataclass(frozen=True)
class Plan:
    tokens_per_step: int
    steps: int
    seconds_per_step: float
    budget_seconds: float | None    # None: the step count was given, not derived from a budget

    def refit(self, *, done: int, elapsed: float, recent_pace: float, warmup_steps: int) -> int:
        """The total steps that fit the budget, given `done` steps took `elapsed` seconds and the
        latest steps `recent_pace` seconds each (the slower of that and the mean pace is assumed: a
        CPU that is getting busier makes the mean too hopeful). Never fewer than done + 1, nor than
        warmup_steps + 1 (a cosine after the warmup is kept, even if that overruns the budget)."""
        if self.budget_seconds is None:
            return self.steps
        remaining = self.budget_seconds * (1 - BUDGET_MARGIN) - elapsed
        pace = max(elapsed / done, recent_pace)
        return max(done + max(1, int(remaining / pace)), warmup_steps + 1)

    @property
    def estimated_seconds(self) -> float:
        return self.steps * self.seconds_per_step

    def describe(self) -> str:
        budget = (f", fitted to a {self.budget_seconds / 60:.1f}-minute budget" if self.budget_seconds is not None
                  else "")
        return (f"plan: {self.tokens_per_step:,} tokens per step × {self.steps:,} steps = "
                f"{self.tokens_per_step * self.steps / 1e6:.1f}M tokens; {self.seconds_per_step * 1e3:.0f} ms per "
                f"step measured ⇒ about {self.estimated_seconds / 60:.1f} min of training{budget}")


def measure_step_seconds(step: Callable[[], None], *, trials: int = 3) -> float:
    """Seconds per call of `step`: the median of `trials` timed calls after one untimed warm-up."""
    step()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plan_run(*, tokens_per_step: int, seconds_per_step: float, steps: int | None, minutes: float | None,
             warmup_steps: int) -> Plan:
    """The steps to run: `steps` as given, or as many as fit in `minutes` (less BUDGET_MARGIN)."""
    if minutes is None:
        if steps is None:
            raise ValueError("plan_run needs steps or minutes")
        return Plan(tokens_per_step, steps, seconds_per_step, None)
    if minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    budget = minutes * 60
    fitted = int(budget * (1 - BUDGET_MARGIN) / seconds_per_step)
    if fitted <= warmup_steps:
        raise SystemExit(f"--minutes {minutes}: {budget:.0f} s fit only {fitted} steps of {seconds_per_step:.3f} s, "
                         f"not more than --warmup-steps {warmup_steps}; give more minutes, a smaller --batch-size "
                         f"or --block-size, or fewer --warmup-steps")
    return Plan(tokens_per_step, fitted, seconds_per_step, budget)
