"""Distillation: the attacker trains a freshly initialised network to imitate the copy
(the teacher) on its own images. No weight of the copy survives, so a weight
fingerprint is not expected to; what the student keeps is the copy's behaviour.

The attacker uses its best recipe: the vendor's own (AdamW, one-cycle schedule) for
``epochs``, the teacher's answers as targets, and its own true labels besides (it owns
them): ``loss = alpha * teacher term + (1 - alpha) * cross-entropy with the true labels``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from securemark import checks
from securemark.attacks.base import Attack, register_attack
from securemark.errors import InvalidConfig
from securemark.model import ModelSpec, SplitNet, build_model
from securemark.training import Recipe, augment, scoped_rng

__all__ = ["Distill", "LABELS"]

LABELS = ("soft", "hard")


@register_attack("distill")
class Distill(Attack):
    """Train a fresh student on the attacker's images labelled by ``models[0]``.

    - ``labels="soft"``: the teacher's class probabilities at ``temperature`` (what an API
      returning scores gives); the teacher term is ``T^2 * KL(teacher_T || student_T)``.
    - ``labels="hard"``: the teacher's predicted class only (a label-only API); the
      teacher term is the cross-entropy with those labels.
    - ``student="same"``: the copy's architecture, freshly initialised; ``"other"``: the
      architecture given by ``widths`` / ``hidden`` (another width or depth).
    - ``augment``: query the teacher on randomly cropped and flipped views too (more
      distinct inputs from the same images).

    Strength: ``alpha`` (the weight of the teacher in the student's loss).
    """

    list_options = ("widths", "hidden")

    def __init__(self, labels: str = "soft", temperature: float = 4.0, alpha: float = 0.7, student: str = "same",
                 widths: list[int] | None = None, hidden: list[int] | None = None, epochs: int = 15, lr: float = 2e-3,
                 batch_size: int = 128, augment: bool = False) -> None:
        self.labels = checks.choice(self.owner, "labels", labels, LABELS)
        self.temperature = checks.number(self.owner, "temperature", temperature, 0.0, low_open=True)
        self.alpha = checks.number(self.owner, "alpha", alpha, 0.0, 1.0)
        self.student = checks.choice(self.owner, "student", student, ("same", "other"))
        if self.student == "other" and widths is None and hidden is None:
            raise InvalidConfig(f"{self.owner}: student 'other' needs widths and/or hidden (the student's architecture)")
        self.widths = None if widths is None else [checks.integer(self.owner, "widths[]", w, 1) for w in widths]
        self.hidden = None if hidden is None else [checks.integer(self.owner, "hidden[]", h, 1) for h in hidden]
        self.epochs = checks.integer(self.owner, "epochs", epochs, 1)
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.batch_size = checks.integer(self.owner, "batch_size", batch_size, 1)
        if not isinstance(augment, bool):
            raise InvalidConfig(f"{self.owner}: augment must be true or false, got {augment!r}")
        self.augment = augment
        self._config = dict(labels=self.labels, temperature=self.temperature, alpha=self.alpha, student=self.student,
                            widths=self.widths, hidden=self.hidden, epochs=self.epochs, lr=self.lr,
                            batch_size=self.batch_size, augment=self.augment)

    @property
    def name(self) -> str:
        """``distill_soft`` / ``distill_hard``, with ``_other`` for another architecture."""
        return f"{self.kind}_{self.labels}" + ("_other" if self.student == "other" else "")

    @property
    def strength(self) -> float:
        return self.alpha

    def student_spec(self, teacher: SplitNet) -> ModelSpec:
        spec = teacher.spec
        if self.student == "same":
            return spec
        widths = tuple(self.widths) if self.widths is not None else spec.widths
        hidden = tuple(self.hidden) if self.hidden is not None else spec.hidden
        # the attacker's own architecture: no bottleneck (nothing of it is split-trained)
        return ModelSpec(widths=widths, hidden=hidden, cut=min(spec.cut, len(widths)), norm=spec.norm, dropout=spec.dropout)

    def apply(self, models, data, generator):
        teacher = models[0].eval()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        student = build_model(self.student_spec(teacher), seed).train()
        recipe = Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        opt, schedule = recipe.optimizer(student.parameters(), self.epochs * math.ceil(len(data) / self.batch_size))
        T = self.temperature
        with scoped_rng(generator):
            for _ in range(self.epochs):
                for idx in torch.randperm(len(data), generator=generator).split(self.batch_size):
                    x, y = data.images[idx], data.labels[idx]
                    if self.augment:
                        x = augment(x, generator)
                    with torch.no_grad():
                        answer = teacher(x)
                    logits = student(x)
                    if self.labels == "soft":
                        imitate = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(answer / T, 1), log_target=True, reduction="batchmean") * T * T
                    else:
                        imitate = F.cross_entropy(logits, answer.argmax(1))
                    loss = self.alpha * imitate + (1.0 - self.alpha) * F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    schedule.step()
        return student.eval()
