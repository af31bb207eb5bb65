"""qkv_attention: self-attention as custom C++ autograd operators for PyTorch.

Importing the package loads the C++ extension, which registers
``torch.ops.qkv_attention.qkv_projection``, ``.attention``, ``.attention_with_weights``,
``.attention_varlen`` and ``.merge_heads`` (with their backward ops), and the inference op
``.attention_with_kv_cache`` with the PyTorch dispatcher.
"""

import torch  # noqa: F401  (the extension links against torch's libraries)

from ._torch_check import check_installed_torch

check_installed_torch()  # before _C: another torch release could not load it

from . import _C  # noqa: E402
from . import _vmap, ops, functional  # noqa: E402
from .modules import MultiheadAttention  # noqa: E402
from .replace import replace_attention  # noqa: E402
from .kv_cache import KVCache  # noqa: E402
from ._C import build_info  # noqa: E402

__version__ = _C.__version__

_vmap.register()  # torch.func.vmap batching rules for every op

__all__ = [
    "ops",
    "functional",
    "build_info",
    "__version__",
    "MultiheadAttention",
    "replace_attention",
    "KVCache",
]
