"""The non-finite guard: which steps were skipped, when to roll back, when to give up (docs/reliability.md).

A step with a non-finite loss or gradient norm is never applied. `train.max_consecutive_nonfinite`
such steps in a row ask for a rollback to the newest checkpoint from before the streak, at most
`train.max_rollbacks` times; a run that ends inside a streak hands back no weights.
"""

from __future__ import annotations

from dataclasses import dataclass


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite and rollbacks could not fix it; weights not written."""


@dataclass
class NonFiniteGuard:
    max_consecutive: int
    max_rollbacks: int
    streak: int = 0
    streak_start: int | None = None  # first step of the current run of non-finite steps
    rollbacks: int = 0

    @property
    def healthy(self) -> bool:
        """No step of a streak is pending: the weights may be checkpointed and handed back."""
        return self.streak == 0

    def record(self, step: int, skipped: bool) -> bool:
        """Count one optimizer step; True when the streak asks for a rollback now."""
        if skipped:
            self.streak += 1
            self.streak_start = step if self.streak_start is None else self.streak_start
        else:
            self.streak, self.streak_start = 0, None
        return self.streak >= self.max_consecutive

    def start_rollback(self, checkpoints: str) -> None:
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise TrainingDiverged(
                f"the loss went non-finite again after {self.max_rollbacks} rollbacks (from step "
                f"{self.streak_start}); lower optim.lr, raise warmup, or train in bf16/fp32; the last good "
                f"checkpoint is in {checkpoints}"
            )

    def no_checkpoint_to_roll_back_to(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the loss or gradients were non-finite for {self.streak} steps from step {self.streak_start} "
            "and no checkpoint from before that exists to roll back to; lower optim.lr or raise the warmup"
        )

    def rolled_back(self) -> None:
        self.streak, self.streak_start = 0, None

    def check_end(self) -> None:
        """Refuse the weights of a run that ended inside a streak."""
        if self.streak:
            raise TrainingDiverged(
                f"the run ended inside {self.streak} non-finite steps (from step {self.streak_start}); its "
                "weights are not trustworthy. Lower optim.lr, or resume from the last checkpoint with other "
                "settings"
            )
