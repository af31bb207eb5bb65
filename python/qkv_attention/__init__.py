"""qkv_attention: self-attention as custom C++ autograd operators for PyTorch.

Importing the package loads the C++ extension, which registers
``torch.ops.qkv_attention.qkv_projection``, ``.attention``, ``.attention_with_weights``,
``.attention_varlen`` and ``.merge_heads`` (with their backward ops), and the inference op
``.attention_with_kv_cache`` with the PyTorch dispatcher.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C
from . import _vmap, ops, functional
from .modules import MultiheadAttention
from .replace import replace_attention
from .kv_cache import KVCache
from ._C import build_info

__version__ = _C.__version__

_vmap.register()  # torch.func.vmap batching rules for every op

__all__ = [
    "ops", "functional", "build_info", "__version__", "MultiheadAttention", "replace_attention",
    "KVCache",
]
