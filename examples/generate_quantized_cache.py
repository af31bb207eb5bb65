"""Greedy generation of a Llama-style decoder through a decoding loop over `KVCache`, with a
float cache and with a quantized one (int8 by default): tokens per second of each and the share
of generated tokens where the quantized cache's run differs from the float cache's.

    python examples/generate_quantized_cache.py [--cache-dtype int8|float8_e4m3fn|float8_e5m2]
        [--layers 8] [--embed 1024] [--heads 16] [--kv-heads 4] [--batch 8] [--prompt 2048]
        [--new-tokens 64] [--threads N]

The model has random weights (RMSNorm, rotary positions, grouped key/value heads, a SwiGLU MLP)
scaled so that its next-token distribution is sharp enough for greedy decoding to be
meaningful; both runs start from the same weights and prompts. Each run is a prefill of the
whole prompt batch, then one step per new token; the times are the decode steps' (the prefill
is the same work for both caches and is reported apart). Tokens per second = batch x new tokens
/ decode seconds.
"""

import argparse
import time

import torch
from torch import nn

from qkv_attention import KVCache

DTYPES = {
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rotate(x, positions, base=10000.0):
    """Rotary position embedding of x (B, heads, L, D) at positions (B, L)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, L, D/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class DecoderLayer(nn.Module):
    def __init__(self, embed: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, embed // heads
        self.attn_norm, self.mlp_norm = RMSNorm(embed), RMSNorm(embed)
        self.q = nn.Linear(embed, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(embed, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, embed, bias=False)
        hidden = 8 * embed // 3
        self.gate_up = nn.Linear(embed, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, embed, bias=False)

    def forward(self, x, positions, cache: KVCache):  # x (B, L, E)
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        kv = self.kv(h).view(B, L, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, Hkv, L, D)
        a = cache.attend(rotate(q, positions), rotate(k, positions).contiguous(), v.contiguous())
        x = x + self.out(a.transpose(1, 2).reshape(B, L, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(nn.functional.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, vocab: int, embed: int, heads: int, kv_heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.layers = nn.ModuleList(DecoderLayer(embed, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(embed)
        self.lm_head = nn.Linear(embed, vocab, bias=False)

    def forward(self, tokens, positions, caches):  # tokens (B, L) -> logits (B, L, vocab)
        x = self.embed(tokens)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, positions, cache)
        return self.lm_head(self.norm(x))


def generate(model, prompts, new_tokens, cache_dtype, max_len):
    """Greedy tokens (B, new_tokens) and (prefill seconds, decode seconds)."""
    B, P = prompts.shape
    first = model.layers[0]
    caches = [
        KVCache(B, first.kv_heads, max_len, first.head_dim, dtype=cache_dtype) for _ in model.layers
    ]
    positions = torch.arange(P).expand(B, P)
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(prompts, positions, caches)
        prefill = time.perf_counter() - start
        token = logits[:, -1].argmax(-1)  # (B,)
        generated = [token]
        start = time.perf_counter()
        for step in range(1, new_tokens):
            position = torch.full((B, 1), P + step - 1)
            token = model(token[:, None], position, caches)[:, -1].argmax(-1)
            generated.append(token)
        decode = time.perf_counter() - start
    return torch.stack(generated, 1), (prefill, decode)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dtype", choices=sorted(DTYPES), default="int8")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Decoder(args.vocab, args.embed, args.heads, args.kv_heads, args.layers).eval()
    with torch.no_grad():  # a sharper next-token distribution than the default init gives
        model.lm_head.weight.mul_(8.0)
    prompts = torch.randint(args.vocab, (args.batch, args.prompt))
    max_len = args.prompt + args.new_tokens
    float_tokens, float_times = generate(model, prompts, args.new_tokens, torch.float32, max_len)
    quant_dtype = DTYPES[args.cache_dtype]
    quant_tokens, quant_times = generate(model, prompts, args.new_tokens, quant_dtype, max_len)
    tokens = args.batch * (args.new_tokens - 1)  # the first token comes from the prefill
    differ = (float_tokens != quant_tokens).float().mean().item()
    print(
        f"{args.layers} layers, E {args.embed}, {args.heads}/{args.kv_heads} heads, batch "
        f"{args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    for name, times in (("float32 cache", float_times), (f"{args.cache_dtype} cache", quant_times)):
        print(
            f"{name:22s} prefill {times[0]:7.2f} s   decode {times[1]:7.2f} s   "
            f"{tokens / times[1]:8.1f} tokens/s"
        )
    print(
        f"decode speedup {float_times[1] / quant_times[1]:.2f}x; tokens that differ: {differ:.1%}"
    )


if __name__ == "__main__":
    main()
