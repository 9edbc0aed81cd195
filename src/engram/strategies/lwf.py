"""Learning without Forgetting (Li & Hoiem 2016) with its teacher restored from the store.

The teacher (the model as it was after the previous experience) is committed as a
state component; content addressing stores its tensors once however many versions
reference it. Distillation follows Avalanche's LwF: KL divergence at temperature T on
the units of the classes each previous task has seen.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule, avalanche_forward

from engram.strategies.entry import DeclaredHparams
from engram.strategies.registry import default


class LwFPlugin(DeclaredHparams, SupervisedPlugin):
    engram_name = "lwf"

    def __init__(
        self,
        alpha: float = default("lwf", "alpha"),
        temperature: float = default("lwf", "temperature"),
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.temperature = temperature
        self.teacher_weights: dict[str, torch.Tensor] = {}
        self.classes_by_task: dict[int, list[int]] = {}
        self._teacher: torch.nn.Module | None = None

    def _teacher_for(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._teacher is None:
            # A copy of the current architecture; units grown since the teacher was taken
            # keep the student's values but are never distilled (not in classes_by_task).
            self._teacher = copy.deepcopy(model)
            self._teacher.load_state_dict(self.teacher_weights, strict=False)
            self._teacher.eval()
        return self._teacher

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not self.teacher_weights:
            return
        teacher = self._teacher_for(strategy.model)
        x = strategy.mb_x
        loss = torch.zeros(())
        for task, classes in self.classes_by_task.items():
            with torch.no_grad():
                target = avalanche_forward(teacher, x, torch.full((len(x),), task))
            if isinstance(strategy.model, MultiTaskModule):
                student = strategy.model.forward_single_task(x, task)
            else:
                student = strategy.mb_output
            loss = loss + self._distillation(student, target, classes)
        strategy.loss += self.alpha * loss

    def _distillation(
        self, out: torch.Tensor, target: torch.Tensor, units: list[int]
    ) -> torch.Tensor:
        t = self.temperature
        log_p = F.log_softmax(out[:, units] / t, dim=1)
        q = F.softmax(target[:, units] / t, dim=1)
        return F.kl_div(log_p, q, reduction="batchmean")

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.teacher_weights = {
            k: v.detach().clone() for k, v in strategy.model.state_dict().items()
        }
        self._teacher = None
        experience = strategy.experience
        for task in experience.task_labels:
            seen = set(self.classes_by_task.get(int(task), []))
            seen.update(int(c) for c in experience.classes_in_this_experience)
            self.classes_by_task[int(task)] = sorted(seen)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher_weights, "classes_by_task": self.classes_by_task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher_weights = state["teacher"]
        self.classes_by_task = {int(k): list(v) for k, v in state["classes_by_task"].items()}
        self._teacher = None
