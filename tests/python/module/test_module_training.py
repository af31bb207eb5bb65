"""Fifty optimizer steps with our MultiheadAttention and with torch's, from the same
initialisation: the loss curves and the trained parameters agree (float64)."""

import copy

import pytest
import torch
from torch import nn

import qkv_attention

STEPS = 50
VOCAB, E, H, N, L = 11, 12, 3, 4, 7
f64 = torch.float64
# float64: per-step differences start at ~1e-16 (summation order) and the optimizers carry
# them forward without blowing them up over 50 steps: measured <= 4e-16 relative on the Adam
# losses and <= 2e-15 on the parameters; 1e-9 leaves room for other BLAS builds, while any real
# difference (a wrong gradient term) shows at 1e-3 or more.
TOL = dict(atol=1e-9, rtol=1e-9)


class TinyTagger(nn.Module):
    """Embedding -> causal, padded self-attention (+ a cross-attention with kdim/vdim) ->
    layer norm -> per-position classifier."""

    def __init__(self, attention_class):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, E, dtype=f64)
        self.self_attn = attention_class(E, H, add_bias_kv=True, batch_first=True, dtype=f64)
        self.cross_attn = attention_class(
            E, H, kdim=5, vdim=6, add_zero_attn=True, batch_first=True, dtype=f64
        )
        self.norm = nn.LayerNorm(E, dtype=f64)
        self.head = nn.Linear(E, VOCAB, dtype=f64)

    def forward(self, tokens, padding, context):
        x = self.embed(tokens)
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        attended, _ = self.self_attn(
            x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=False
        )
        x = x + attended
        crossed, weights = self.cross_attn(x, context[..., :5], context, need_weights=True)
        x = self.norm(x + crossed)
        # The returned weights take part in the loss too, so their gradient is trained on.
        return self.head(x), weights


def batches():
    """Five fixed batches, cycled: a task the model can visibly fit in fifty steps (predict
    the previous token, which the causal attention can see)."""
    generator = torch.Generator().manual_seed(123)
    fixed = []
    for _ in range(5):
        tokens = torch.randint(0, VOCAB, (N, L), generator=generator)
        padding = torch.rand(N, L, generator=generator) < 0.2
        padding[:, 0] = False
        context = torch.randn(N, 3, 6, generator=generator, dtype=f64)
        fixed.append((tokens, padding, context))
    for step in range(STEPS):
        yield fixed[step % len(fixed)]


def train(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for tokens, padding, context in batches():
        logits, weights = model(tokens, padding, context)
        targets = tokens.roll(1, dims=1)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss = loss + 0.1 * weights.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=f64)


def test_fifty_adam_steps_match_torch():
    torch.manual_seed(0)
    theirs = TinyTagger(nn.MultiheadAttention)
    torch.manual_seed(0)
    ours = TinyTagger(qkv_attention.MultiheadAttention)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)  # the same init from the same seed

    theirs_losses = train(theirs)
    ours_losses = train(ours)
    assert theirs_losses[-5:].mean() < 0.8 * theirs_losses[:5].mean(), "nothing was learned"
    torch.testing.assert_close(ours_losses, theirs_losses, **TOL)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_fifty_sgd_steps_of_a_replaced_transformer_encoder_match_torch():
    """Training mode with the layers' dropout on (attention dropout 0, see
    test_module_replace): the same seeds give the same dropout masks in both models."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 24, dropout=0.1, batch_first=True, dtype=f64)
    layer.self_attn.dropout = 0.0
    theirs = nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=2), nn.Linear(E, 1, dtype=f64)
    ).train()
    ours = qkv_attention.replace_attention(copy.deepcopy(theirs))

    def train_encoder(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        generator = torch.Generator().manual_seed(7)
        losses = []
        for step in range(STEPS):
            x = torch.randn(N, L, E, generator=generator, dtype=f64)
            target = x.sum(-1, keepdim=True).tanh()
            torch.manual_seed(step)
            loss = (model(x) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=f64)

    theirs_losses = train_encoder(theirs)
    ours_losses = train_encoder(ours)
    assert theirs_losses[-10:].mean() < 0.8 * theirs_losses[:10].mean()
    torch.testing.assert_close(ours_losses, theirs_losses, **TOL)
