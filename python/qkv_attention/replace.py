"""``replace_attention``: swap torch's ``nn.MultiheadAttention`` modules in a model for ours."""

from typing import Dict

from torch import nn

from .modules import MultiheadAttention

__all__ = ["replace_attention"]


def _replacement_for(old: nn.MultiheadAttention) -> MultiheadAttention:
    """Our module holding ``old``'s very parameters (the same Parameter objects, so device,
    dtype, requires_grad and any optimizer state keyed by them carry over) and its mode."""
    # Built on the meta device: no memory, and no draws from the random generator, so a
    # seeded run is the same with or without the swap.
    new = MultiheadAttention(
        old.embed_dim,
        old.num_heads,
        dropout=old.dropout,
        bias=old.in_proj_bias is not None,
        add_bias_kv=old.bias_k is not None,
        add_zero_attn=old.add_zero_attn,
        kdim=old.kdim,
        vdim=old.vdim,
        batch_first=old.batch_first,
        device="meta",
    )
    # _qkv_same_embed_dim decides between packed and separate weights; old pickles default it.
    if new._qkv_same_embed_dim != old._qkv_same_embed_dim:
        raise RuntimeError(
            "replace_attention: the module has kdim={}, vdim={}, embed_dim={} but "
            "_qkv_same_embed_dim={}; cannot tell which projection weights it holds".format(
                old.kdim, old.vdim, old.embed_dim, old._qkv_same_embed_dim
            )
        )
    for name in (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
    ):
        param = getattr(old, name)
        if param is None:
            new.register_parameter(name, None)
        else:
            setattr(new, name, param)
    new.bias_k, new.bias_v = old.bias_k, old.bias_v
    new.out_proj = old.out_proj
    new.train(old.training)
    return new


def replace_attention(model: nn.Module) -> nn.Module:
    """Replaces every ``torch.nn.MultiheadAttention`` inside ``model`` by
    :class:`qkv_attention.MultiheadAttention`, in place, and returns ``model``.

    The replacement holds the original's parameters (the same tensors: weights, device, dtype
    and ``requires_grad`` are unchanged, and an optimizer built before the swap keeps working)
    and its train/eval mode. A module shared between several places is replaced by one shared
    replacement. Only modules whose type is exactly ``nn.MultiheadAttention`` are replaced
    (a subclass may override ``forward``). Hooks registered on the old modules are not carried
    over.

    ``nn.TransformerEncoder`` turns padded input into nested tensors in eval mode without grad;
    for encoders whose layers now hold our module this is switched off
    (``use_nested_tensor = False``), so the layers receive the padded input and the mask.
    ``nn.TransformerEncoderLayer``'s fused inference path (``torch._transformer_encoder_layer_fwd``,
    taken in eval mode without grad) is skipped too, so our forward is what runs: in eager mode
    our module's forward pre-hook alone does that (the layer checks for hooks), but a layer
    compiled with ``torch.jit.script`` cannot see hooks. So each ``nn.TransformerEncoderLayer``
    holding our module also gets ``activation_relu_or_gelu = 0``: that attribute only records,
    for the fused path, whether the activation is relu or gelu (the regular path calls
    ``layer.activation``), and 0 keeps the layer off the fused path in eager and scripted
    code alike. A layer that holds our module placed there by hand, not by this function, runs
    the fused kernel on our module's parameters once scripted, unless that attribute is 0.

    If ``model`` is itself an ``nn.MultiheadAttention``, the replacement is returned.
    """
    if type(model) is nn.MultiheadAttention:
        return _replacement_for(model)
    replacements: Dict[int, MultiheadAttention] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.MultiheadAttention:
                if id(child) not in replacements:
                    replacements[id(child)] = _replacement_for(child)
                setattr(parent, name, replacements[id(child)])
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(inner, MultiheadAttention) for inner in module.modules()
        ):
            module.use_nested_tensor = False
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(
            getattr(module, "self_attn", None), MultiheadAttention
        ):
            # Off the fused path in scripted code too (see the docstring).
            module.activation_relu_or_gelu = 0
    return model
