"""Per-step losses kept on the device and read by the host in one transfer every few steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    epoch: int
    step: int
    learning_rate: float
    loss: float
    skipped: bool  # the optimizer step was skipped for a non-finite loss or gradient


@dataclass
class StepLosses:
    """Per-step losses and skip flags kept on the device, read in one transfer every ``read_every`` steps.

    On a GPU a ``.item()`` per step would make the host wait for the step to finish before queuing
    the next one; here the host reads only at log points (and where the loop needs the values:
    epoch ends, checkpoints, stops).
    """

    read_every: int
    pending: list = field(default_factory=list)
    reads: int = 0  # host transfers so far (what the test counts)

    def add(self, epoch: int, step: int, learning_rate: float, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        self.pending.append((epoch, step, learning_rate, loss.detach().float().reshape(()),
                             skipped.detach().float().reshape(())))

    def due(self, step: int) -> bool:
        return bool(self.pending) and (self.read_every <= 1 or step % self.read_every == 0)

    def read(self) -> list[StepRecord]:
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss, skipped]) for *_, loss, skipped in self.pending]).cpu().tolist()
        self.reads += 1
        records = [StepRecord(epoch, step, lr, loss, bool(skipped))
                   for (epoch, step, lr, _, _), (loss, skipped) in zip(self.pending, values)]
        self.pending = []
        return records


def read_interval(device_type: str) -> int:
    """Steps between host reads of the losses: every step on a CPU (a read costs nothing there)."""
    return 1 if device_type == "cpu" else 25
