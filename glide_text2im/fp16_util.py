"""Half-precision conversion of the U-Net torso and the text transformer.

The official fp16 models keep every norm, the timestep-embedding linears, the output head
and the text position/padding embeddings in float32 (``spec/fp16_dtypes.json``); only the
convolutions of the torso and the linear layers of the text side run in float16.
"""

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _cast_params(module: nn.Module, dtype: torch.dtype) -> None:
    module.weight.data = module.weight.data.to(dtype)
    if getattr(module, "bias", None) is not None:
        module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast a convolution's parameters to float16 (other modules are left alone); use with ``.apply``."""
    if isinstance(module, _CONVS):
        _cast_params(module, torch.float16)


def convert_module_to_f32(module: nn.Module) -> None:
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, _CONVS):
        _cast_params(module, torch.float32)


def convert_linear_to_f16(module: nn.Module) -> None:
    """Cast a linear layer's or an embedding table's parameters to float16; use with ``.apply``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        _cast_params(module, torch.float16)


def convert_linear_to_f32(module: nn.Module) -> None:
    """Undo :func:`convert_linear_to_f16`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        _cast_params(module, torch.float32)
