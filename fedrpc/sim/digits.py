"""The simulation's task: scikit-learn's handwritten digits, split and partitioned, and its network.

``load_digits`` ships inside scikit-learn (1,797 8x8 images, ten classes), so
nothing is downloaded. The split is stratified 80/20 with a fixed seed; the
training part is partitioned over devices IID or by a Dirichlet(alpha) draw
of each class's share per device. The same functions serve ``fedrpc simulate``,
its tests, the centralized baseline and the Flower peer in ``bench/simulate.py``,
so every contender sees the same data, network and local steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "FEATURES",
    "CLASSES",
    "Split",
    "LocalSteps",
    "load_split",
    "partition",
    "make_net",
    "local_train",
    "evaluate",
    "centralized_baseline",
]

FEATURES, CLASSES, HIDDEN = 64, 10, 32


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # float32, pixel values scaled to [0, 1]
    y_train: np.ndarray  # int64 labels
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class LocalSteps:
    """What each device does with its data in one round (the round's client_config)."""

    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 0.2
    proximal_mu: float = 0.0


def load_split(seed: int = 0) -> Split:
    """The stratified 80/20 split of load_digits (1,437 training, 360 held-out images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    return Split(x_train, y_train, x_test, y_test)


def partition(labels: np.ndarray, devices: int, scheme: str, seed: int = 0) -> list[np.ndarray]:
    """Indices of each device's examples: ``iid`` or ``dirichlet:ALPHA``.

    IID deals a seeded permutation round-robin, so sizes differ by at most one.
    Dirichlet draws, per class, the shares of the devices from Dir(alpha) and
    cuts that class's examples accordingly (smaller alpha, more skew); a device
    left empty takes one example from the largest, so every device can train.
    """
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(labels))
        return [np.sort(order[d::devices]) for d in range(devices)]
    kind, _, value = scheme.partition(":")
    if kind != "dirichlet" or not value:
        raise ValueError(f"partition must be iid or dirichlet:ALPHA, not {scheme!r}")
    alpha = float(value)
    if not alpha > 0:
        raise ValueError("the Dirichlet alpha must be positive")
    parts: list[list[int]] = [[] for _ in range(devices)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].extend(chunk.tolist())
    for device in range(devices):
        if not parts[device]:
            donor = max(range(devices), key=lambda d: len(parts[d]))
            parts[device].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def make_net(seed: int = 0) -> nn.Module:
    """A 64-32-10 perceptron with one hidden ReLU layer: 2,410 parameters, initialised from
    ``seed`` (without touching torch's global generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def local_train(
    net: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    steps: LocalSteps,
    *,
    seed: int = 0,
    proximal_to: dict[str, torch.Tensor] | None = None,
) -> float:
    """Plain minibatch SGD on cross-entropy, in place; the mean loss of the last epoch.

    With ``steps.proximal_mu`` > 0 and ``proximal_to`` (the round's base
    weights), each step adds FedProx's (mu/2)·||w - w_base||² to the loss.
    The step is ``w -= lr · grad`` written out (no optimizer object, one loss
    read per epoch): with a handful of examples per device, per-step overhead
    is most of the cost.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    names, params = zip(*net.named_parameters(), strict=True)
    anchors = None
    if steps.proximal_mu > 0 and proximal_to is not None:
        anchors = [proximal_to[name] for name in names]
    net.train()
    last = 0.0
    for _ in range(steps.epochs):
        order = torch.randperm(len(labels), generator=generator)
        losses = []
        for start in range(0, len(labels), steps.batch_size):
            batch = order[start : start + steps.batch_size]
            loss = nn.functional.cross_entropy(net(inputs[batch]), labels[batch])
            if anchors is not None:
                loss = loss + steps.proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)
                )
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=steps.learning_rate)
            losses.append(loss.detach())
        last = float(torch.stack(losses).mean())
    net.eval()
    return last


def evaluate(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of logits against labels, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    return float((logits.argmax(axis=1) == y).mean()), loss


def centralized_baseline(split: Split, epochs: int = 50, seed: int = 0) -> float:
    """Held-out accuracy of the same network trained on all training data in one place:
    what accuracy the task allows (the reference the simulation is compared with)."""
    net = make_net(seed)
    local_train(net, split.x_train, split.y_train, LocalSteps(epochs, 32, 0.1), seed=seed)
    with torch.no_grad():
        logits = net(torch.from_numpy(split.x_test)).numpy()
    return evaluate(logits, split.y_test)[0]
