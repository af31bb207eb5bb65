"""The demo's task and model, shared by train_transformer.py and train_ddp.py.

Task: sequence reversal. The input is a random string of letters; the target at position i is
the input letter at position L-1-i. A model can only solve it by moving information from input
position L-1-i to output position i, which is what attention does: a trained model's attention
weights should show that anti-diagonal.

Model: a small pre-norm Transformer encoder (token + learned position embeddings, N blocks of
self-attention and a feed-forward layer). The attention class is a constructor argument, so
the same model is built with ``torch.nn.MultiheadAttention`` or
``qkv_attention.MultiheadAttention``; both have the same parameter names, so one's state_dict
loads into the other.
"""

import string
from typing import List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

ALPHABET = string.ascii_uppercase


def make_batch(
    generator: torch.Generator, batch_size: int, length: int, vocab_size: int
) -> Tuple[Tensor, Tensor]:
    """Random sequences (batch_size, length) of token ids < vocab_size and their reversals."""
    inputs = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    return inputs, inputs.flip(-1)


def token_names(tokens: Tensor) -> List[str]:
    """Letters for token ids (A, B, ...), for labels and printing."""
    return [ALPHABET[t] for t in tokens.tolist()]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(
        self,
        attention_class: Type[nn.Module],
        d_model: int,
        num_heads: int,
        ff_dim: int,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model, dtype=dtype)
        # dropout=0: the twins must see the same computation (the two modules draw dropout masks
        # from different random streams, so any dropout would make them diverge).
        self.attention = attention_class(
            d_model, num_heads, dropout=0.0, batch_first=True, dtype=dtype
        )
        self.feed_forward_norm = nn.LayerNorm(d_model, dtype=dtype)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, ff_dim, dtype=dtype),
            nn.GELU(),
            nn.Linear(ff_dim, d_model, dtype=dtype),
        )

    def forward(self, x: Tensor, need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        h = self.attention_norm(x)  # (B, L, E)
        attended, weights = self.attention(
            h, h, h, need_weights=need_weights, average_attn_weights=False
        )  # (B, L, E), weights (B, H, L, L) or None
        x = x + attended
        return x + self.feed_forward(self.feed_forward_norm(x)), weights


class ReversalTransformer(nn.Module):
    def __init__(
        self,
        attention_class: Type[nn.Module] = nn.MultiheadAttention,
        vocab_size: int = 16,
        length: int = 12,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        ff_dim: int = 128,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if vocab_size > len(ALPHABET):
            raise ValueError(f"vocab_size must be at most {len(ALPHABET)}, got {vocab_size}")
        self.length = length
        self.token_embedding = nn.Embedding(vocab_size, d_model, dtype=dtype)
        self.position_embedding = nn.Embedding(length, d_model, dtype=dtype)
        self.blocks = nn.ModuleList(
            TransformerBlock(attention_class, d_model, num_heads, ff_dim, dtype)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(d_model, dtype=dtype)
        self.classifier = nn.Linear(d_model, vocab_size, dtype=dtype)

    def forward(self, tokens: Tensor, need_weights: bool = False):
        """tokens (B, L) -> logits (B, L, vocab); with need_weights also a list with one
        (B, H, L, L) tensor of attention weights per layer."""
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, E)
        weights = []
        for block in self.blocks:
            x, layer_weights = block(x, need_weights)
            weights.append(layer_weights)
        logits = self.classifier(self.final_norm(x))
        return (logits, weights) if need_weights else logits


def loss_and_accuracy(logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy, token accuracy and whole-sequence accuracy of (B, L, V) logits."""
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    correct = logits.argmax(-1) == targets  # (B, L)
    return loss, correct.double().mean(), correct.all(-1).double().mean()


def max_parameter_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest |a - b| over all parameters, matched by name (the names must agree)."""
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    if a_params.keys() != b_params.keys():
        raise ValueError(f"parameter names differ: {sorted(a_params.keys() ^ b_params.keys())}")
    return max((a_params[n] - b_params[n]).abs().max().item() for n in a_params)
