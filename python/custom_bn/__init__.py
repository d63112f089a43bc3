"""custom_bn: BatchNorm as torch operators (fused CPU and CUDA kernels, C++ autograd).

Importing the package loads the compiled operator library ``custom_bn._C``, which registers
``torch.ops.custom_bn.*``, and the fake kernels that let torch.compile/torch.export trace them.
"""

import torch  # noqa: F401  (loads libtorch, which custom_bn._C links against)

from . import _C  # noqa: F401  (registers torch.ops.custom_bn.*)
from . import _meta  # noqa: F401  (fake kernels for torch.compile / export)
from . import functional
from ._build_info import build_info
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
)
from .sync import SyncBatchNorm, convert_sync_batchnorm
from .convert import convert_model, register_conversion
from . import _interop  # noqa: F401  (torch.ao fusers, convert_sync_batchnorm warning)

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "InPlaceBatchNormAct1d",
    "InPlaceBatchNormAct2d",
    "InPlaceBatchNormAct3d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "convert_model",
    "register_conversion",
    "__version__",
]
