"""Small test networks and the artifacts an org admin would make from them.

Reusable by any test that needs a model version: a plain MLP (every
state-dict tensor becomes an ONNX initializer under its own name) and a
Conv2d+BatchNorm+Linear net (the exporter folds BatchNorm, so its ONNX
initializers do not map to the state dict).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

__all__ = [
    "NETS",
    "ConvBNNet",
    "MLP",
    "make_net",
    "numpy_state",
    "onnx_bytes",
    "program_bytes",
]


class MLP(nn.Module):
    """Two linear layers on a 6-feature input."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvBNNet(nn.Module):
    """Conv2d, BatchNorm2d and a linear head on a 3x5x5 input."""

    input_shape = (3, 5, 5)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class WideMLP(nn.Module):
    """A 316-wide hidden layer: 100,806 parameters, the size the SecAgg+ tests ask for."""

    input_shape = (316,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(316, 316)
        self.fc2 = nn.Linear(316, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


NETS = {"mlp": MLP, "convbn": ConvBNNet, "wide": WideMLP}


def make_net(kind: str, seed: int) -> nn.Module:
    """A net in eval mode with every state-dict tensor random, BatchNorm stats too."""
    generator = torch.Generator().manual_seed(seed)
    net = NETS[kind]()
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(seed)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return net.eval()


def numpy_state(net: nn.Module) -> dict[str, np.ndarray]:
    """The net's state dict as numpy copies."""
    return {name: t.detach().numpy().copy() for name, t in net.state_dict().items()}


def _program(net: nn.Module, dynamic: bool) -> torch.export.ExportedProgram:
    example = torch.zeros((2, *net.input_shape))
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    return torch.export.export(net, (example,), dynamic_shapes=shapes)


def program_bytes(net: nn.Module, *, dynamic: bool = True) -> bytes:
    """``torch.export.save`` of the net, with a dynamic batch dimension by default."""
    buffer = io.BytesIO()
    torch.export.save(_program(net, dynamic), buffer)
    return buffer.getvalue()


def onnx_bytes(net: nn.Module) -> bytes:
    """The net's ONNX model with a dynamic batch dimension (dynamo exporter)."""
    with warnings.catch_warnings():
        # torch's exporter trips its own LeafSpec deprecation warning.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            _program(net, True), dynamo=True, external_data=False, verbose=False
        )
    return program.model_proto.SerializeToString()
