"""The three artifacts of a base version, built from a torch module (docs/model-artifacts.md).

A base version is the network's state dict (safetensors), its ONNX graph and
its ``torch.export`` program, all of the same network and with a dynamic
batch dimension: the server re-exports the program with each aggregated
version and checks that the three agree before it stores anything.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

__all__ = ["module_artifacts"]


def module_artifacts(module: Any, example_input: Any) -> dict[str, bytes]:
    """``{"weights", "onnx", "program"}`` of ``module`` (a ``torch.nn.Module``).

    ``example_input``: one input tensor with a batch dimension of at least 2
    (torch.export treats a size-1 dimension as a constant); that dimension
    is exported as dynamic, the others as they are. The module is put in
    eval mode.
    """
    import safetensors.torch
    import torch

    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be one tensor with a batch dimension")
    if example_input.shape[0] < 2:
        raise ValueError("example_input needs a batch of at least 2 to export it as dynamic")
    module = module.eval()
    program = torch.export.export(
        module,
        (example_input,),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    archive = io.BytesIO()
    torch.export.save(program, archive)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # The dynamo exporter narrates its steps and trips its own deprecation warnings.
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, external_data=False, verbose=False)
    state = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    return {
        "weights": safetensors.torch.save(state),
        "onnx": onnx_program.model_proto.SerializeToString(),
        "program": archive.getvalue(),
    }
