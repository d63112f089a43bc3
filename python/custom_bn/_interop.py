"""How torch's own tools recognise custom_bn's BatchNorm modules, where a subclass of
``torch.nn.modules.batchnorm._BatchNorm`` is not enough.

* ``torch.ao.quantization.fuse_modules`` looks fusers up by the exact types of the modules (a
  table keyed by ``(nn.Conv2d, nn.BatchNorm2d)``, ...). Every entry that names a torch.nn
  BatchNorm gets a twin naming custom_bn's, with the same fuser, so Conv/Linear + BatchNorm
  (+ ReLU) fuse in eval mode exactly as with torch.nn (the fusers read only the parameters and
  running statistics).
* ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts every ``_BatchNorm`` subclass into
  ``torch.nn.SyncBatchNorm``. For custom_bn modules that swaps custom_bn's kernels for torch's
  (CUDA only), so the call warns when it does that.
"""

import functools
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.quantization import fuser_method_mappings

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

_TWINS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _register_fusers() -> None:
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for ops, fuser in list(table.items()):
        twins = tuple(_TWINS.get(op, op) for op in ops)
        if twins != ops:
            table.setdefault(twins, fuser)


def _warn_on_custom_bn_conversion() -> None:
    convert = nn.SyncBatchNorm.convert_sync_batchnorm  # bound to nn.SyncBatchNorm
    if getattr(convert, "_custom_bn_warns", False):
        return

    @functools.wraps(convert)
    def convert_sync_batchnorm(cls: Any, module: nn.Module, process_group: Optional[Any] = None):
        if isinstance(module, _BatchNorm):
            warnings.warn(
                f"torch.nn.SyncBatchNorm.convert_sync_batchnorm replaces the custom_bn layer "
                f"{module._get_name()} with a torch.nn.SyncBatchNorm, which runs torch's kernels "
                "(CUDA only) instead of custom_bn's; parameters and buffers are kept",
                UserWarning,
                stacklevel=2,
            )
        return convert(module, process_group)

    convert_sync_batchnorm._custom_bn_warns = True  # type: ignore[attr-defined]
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)  # type: ignore[method-assign]


_register_fusers()
_warn_on_custom_bn_conversion()
