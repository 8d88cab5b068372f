"""The two sides of split training: a data owner and the vendor's server.

Each holds only its half of the model and its own optimiser. They talk exclusively
through :mod:`securemark.split.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from securemark.privacy.attackers import StrongDecoder
from securemark.privacy.scores import ssim
from securemark.privacy.defence import DefenceConfig, add_noise, distance_correlation
from securemark.split.messages import GradientReply, SmashedBatch, check_smashed
from securemark.training import Recipe, augment, scoped_rng


def order_generator(seed: int, owner: int) -> torch.Generator:
    """The generator that shuffles owner ``owner``'s batches (also used to replay the order)."""
    return torch.Generator().manual_seed(seed * 1009 + owner)


class DataOwner:
    """Data owner ``index`` (1-based): runs the client part on its private images.

    ``images`` float32 [N, 1, 28, 28] in [0, 1] never leave this object; only the
    (defended) features at the cut do.
    """

    def __init__(
        self,
        index: int,
        client: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        recipe: Recipe,
        total_steps: int,
        defence: DefenceConfig,
        seed: int,
    ) -> None:
        self.index = index
        self.client = client
        self.images, self.labels = images, labels
        self.recipe = recipe
        self.defence = defence
        self.optimizer, self.schedule = recipe.optimizer(client.parameters(), total_steps)
        self._order = order_generator(seed, index)
        self._noise = torch.Generator().manual_seed(seed * 2027 + index)
        self._augment = torch.Generator().manual_seed(seed * 4099 + index)
        self._pending: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self.dcor_sum, self.steps = 0.0, 0
        self.simulator: Simulator | None = None
        if defence.adversary > 0:
            with scoped_rng(torch.Generator().manual_seed(seed * 8191 + index)), torch.no_grad():
                client.eval()  # one image through, for the cut's shape (no batch-norm update)
                self.simulator = Simulator(tuple(client(images[:1]).shape[1:]), defence, recipe.lr)

    def epoch_batches(self, batch_size: int) -> list[torch.Tensor]:
        """This epoch's batches as index tensors (shuffled with the owner's own generator)."""
        perm = torch.randperm(len(self.labels), generator=self._order)
        return list(perm.split(batch_size))

    def forward(self, batch: torch.Tensor) -> SmashedBatch:
        """Compute defended features for one batch and keep the graph for :meth:`backward`."""
        self.client.train()
        x = self.images[batch]
        if self.recipe.augment:  # the owner's own choice of view; only z crosses
            x = augment(x, self._augment)
        z = self.client(x.contiguous(memory_format=torch.channels_last))
        dcor = distance_correlation(x, z) if self.defence.alpha > 0 else None
        penalty = None if dcor is None else self.defence.alpha * dcor
        sent = add_noise(z, self.defence.sigma, self._noise)
        if self.simulator is not None:  # the owner's own attacker learns first, then the client is pushed away from it
            labels = self.labels[batch]
            self.simulator.learn(sent.detach(), labels, x)
            attacked = self.simulator.penalty(sent, labels, x)
            penalty = attacked if penalty is None else penalty + attacked
        self._pending = (sent, penalty, dcor)
        return SmashedBatch(self.index, sent.detach().contiguous(), self.labels[batch].contiguous())

    def backward(self, reply: GradientReply) -> None:
        """Back-propagate the vendor's gradient (plus the NoPeek penalty) and step."""
        sent, penalty, dcor = self._pending
        self._pending = None
        self.optimizer.zero_grad(set_to_none=True)
        if dcor is not None:
            self.dcor_sum += float(dcor.detach())
        if penalty is not None:
            torch.autograd.backward([sent, penalty], [reply.grad, None])
        else:
            sent.backward(reply.grad)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        self.steps += 1

    @torch.no_grad()
    def bank_features(self, batch: torch.Tensor) -> SmashedBatch:
        """Defended features of a batch of this owner's images as the final client
        computes them (evaluation mode, no augmentation), for the vendor's feature bank."""
        self.client.eval()
        x = self.images[batch]
        sent = add_noise(self.client(x), self.defence.sigma, self._noise)
        return SmashedBatch(self.index, sent.contiguous(), self.labels[batch].contiguous())


class Simulator:
    """The owner's simulated attacker (attacker-aware training): a label-conditioned
    decoder trained, one step per client step, to rebuild the owner's images from the
    features it sends; its SSIM above ``tau`` is the client's penalty."""

    def __init__(self, cut_shape: tuple[int, ...], defence: DefenceConfig, lr: float) -> None:
        self.decoder = StrongDecoder(cut_shape, width=defence.simulator_width, blocks=1)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=lr)
        self.weight, self.tau = defence.adversary, defence.tau

    def learn(self, z: torch.Tensor, labels: torch.Tensor, x: torch.Tensor) -> None:
        self.decoder.train()
        recon = self.decoder(z, labels)
        loss = F.mse_loss(recon, x) + 0.5 * (1 - ssim(recon, x))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def penalty(self, z: torch.Tensor, labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.decoder.eval()  # batch-norm statistics from learning, not from the client's step
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        reached = ssim(self.decoder(z, labels), x)
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        return self.weight * F.relu(reached - self.tau)


@dataclass
class FeatureBank:
    """What the server received: features float16 [N, C, H, W], labels, sending owner."""

    features: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    owners: list[torch.Tensor] = field(default_factory=list)

    def add(self, msg: SmashedBatch) -> None:
        self.features.append(msg.features.detach().to(torch.float16))
        self.labels.append(msg.labels.detach().clone())
        self.owners.append(torch.full_like(msg.labels, msg.owner))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features": torch.cat(self.features), "labels": torch.cat(self.labels), "owners": torch.cat(self.owners)}


class SplitServer:
    """The vendor's half: computes the loss on received features, steps, returns dL/dz."""

    def __init__(self, server: nn.Module, cut_shape: tuple[int, ...], recipe: Recipe, total_steps: int, num_classes: int = 10,
                 dropout_seed: int = 0) -> None:
        self.server = server
        self.cut_shape = tuple(cut_shape)
        self.num_classes = num_classes
        self.recipe = recipe
        self.optimizer, self.schedule = recipe.optimizer(server.parameters(), total_steps)
        self.bank: FeatureBank | None = None
        self._dropout = torch.Generator().manual_seed(dropout_seed)  # the server's dropout masks, whatever the process
        self.reset_stats()

    def reset_stats(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def stats(self) -> dict[str, float]:
        n = max(self.seen, 1)
        return {"train_loss": self.loss_sum / n, "train_accuracy": self.correct / n}

    def handle(self, msg: SmashedBatch) -> GradientReply:
        check_smashed(msg, self.cut_shape, self.num_classes)  # raw images never get past here
        self.server.train()
        z = msg.features.detach()
        z = (z.contiguous(memory_format=torch.channels_last) if z.dim() == 4 else z.contiguous()).requires_grad_(True)
        with scoped_rng(self._dropout):
            logits = self.server(z)
            loss = self.recipe.loss(logits, msg.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        n = len(msg.labels)
        self.loss_sum += float(loss.detach()) * n
        self.correct += int((logits.argmax(1) == msg.labels).sum())
        self.seen += n
        return GradientReply(z.grad.detach().contiguous(), float(loss.detach()))

    def record(self, msg: SmashedBatch) -> None:
        """Keep a batch of the owners' final features in the feature bank (no step)."""
        check_smashed(msg, self.cut_shape, self.num_classes)
        if self.bank is None:
            self.bank = FeatureBank()
        self.bank.add(msg)
