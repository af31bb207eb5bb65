"""qkv_attention.huggingface with the attention variants of recent models: sliding windows,
logit soft-capping and attention sinks, against transformers' own ``eager`` attention (the
reference: ``sdpa`` refuses soft-capping and sinks).

Random small configs of gpt-oss (sinks made non-trivial), Gemma 2 (softcap and window),
Gemma 3, Mistral, Qwen2 and Cohere2, each with windows shorter than the prompt: logits with
left padding and in chunked prefill, greedy ``generate()`` with dynamic and static caches, and a
training step's gradients (the sinks' included). The mask function is checked to build no band
where the operator applies the window itself.

Tolerances: eager's own rounding. Most eager functions take the softmax in float32 even in a
float64 model, so float64 models agree to ~1e-7 relative after that rounding passes through the
layers (1e-6 here); gpt-oss's experts take no float64, so it runs in float32 (2e-4, as the
differences of float32 attention through two layers of random weights reach ~1e-5). With
padding every model runs in float32: in a float64 model eager's float32 softmax turns the
mask's float64 minimum into -inf, so a padded query row (no key to see) gives NaN, which then
reaches every row through the next layer's values.
"""

import copy

import pytest
import torch
from transformers import (
    AttentionInterface,
    Cohere2Config,
    Cohere2ForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from qkv_attention import huggingface
from qkv_attention.functional import scaled_dot_product_attention

NAME = huggingface.register()

FLOAT64 = dict(atol=1e-6, rtol=1e-6)
FLOAT32 = dict(atol=2e-4, rtol=2e-4)
WINDOW = 4  # shorter than every prompt below

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    sliding_window=WINDOW,
)
MIXED = ["sliding_attention", "full_attention"]

# name: (config class, model class, extra config, dtype)
MODELS = {
    "gpt_oss": (
        GptOssConfig,
        GptOssForCausalLM,
        dict(num_local_experts=4, num_experts_per_tok=2, layer_types=MIXED),
        torch.float32,
    ),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(layer_types=MIXED, attn_logit_softcapping=1.5, final_logit_softcapping=None),
        torch.float64,
    ),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(layer_types=MIXED), torch.float64),
    "mistral": (MistralConfig, MistralForCausalLM, {}, torch.float64),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(use_sliding_window=True, max_window_layers=1),
        torch.float64,
    ),
    "cohere2": (Cohere2Config, Cohere2ForCausalLM, dict(layer_types=MIXED), torch.float64),
}


def small_model(name, dtype=None, seed=0):
    """The model of MODELS[name] in its dtype, or in ``dtype`` when given."""
    config_class, model_class, extra, own_dtype = MODELS[name]
    dtype = own_dtype if dtype is None else dtype
    config = config_class(**COMMON, **extra)
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    if name == "gpt_oss":
        # Initialized near 0 (std 0.02), the sinks would barely change the softmax.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(config.num_attention_heads) * 2)
    return model


def twins(name, dtype=None):
    """(eager model, qkv_attention model) with identical weights."""
    eager = small_model(name, dtype)
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    return eager, ours


def tolerance(model):
    return FLOAT64 if model.dtype == torch.float64 else FLOAT32


def left_padded_batch(lengths=(11, 7, 3), seed=1):
    """input_ids (B, max length) with left padding (token 0) and its attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 96, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


# --- the mask function ---------------------------------------------------------------------


def sliding_mask(**sizes):
    return huggingface.build_mask(
        batch_size=2,
        mask_function=sliding_window_causal_mask_function(WINDOW),
        local_size=WINDOW,
        **sizes,
    )


@pytest.mark.parametrize(
    "sizes",
    [
        dict(q_length=10, kv_length=10),  # prefill longer than the window
        dict(q_length=3, kv_length=3),  # prefill shorter than the window
        dict(q_length=1, kv_length=4, q_offset=9, kv_offset=6),  # decoding, dynamic cache
        dict(q_length=5, kv_length=8, q_offset=9, kv_offset=6),  # chunked prefill
    ],
    ids=["prefill", "short_prefill", "decoding", "chunked_prefill"],
)
def test_mask_function_leaves_an_unpadded_band_to_the_kernel(sizes):
    assert sliding_mask(**sizes) is None
    ones = torch.ones(2, sizes.get("kv_offset", 0) + sizes["kv_length"], dtype=torch.bool)
    assert sliding_mask(attention_mask=ones, **sizes) is None


def test_mask_function_builds_the_band_where_it_is_not_all_the_mask_says():
    sizes = dict(q_length=5, kv_length=8, q_offset=9, kv_offset=6)
    padding = torch.ones(2, 14, dtype=torch.bool)
    padding[1, 7] = False  # a padded key inside the keys read
    expected = sdpa_mask(
        batch_size=2,
        mask_function=sliding_window_causal_mask_function(WINDOW),
        attention_mask=padding,
        local_size=WINDOW,
        allow_is_causal_skip=False,
        **sizes,
    )
    assert torch.equal(sliding_mask(attention_mask=padding, **sizes), expected)
    # Keys past the last query (a static cache not yet full): not the bottom-right band.
    static = dict(q_length=3, kv_length=WINDOW)
    built = sliding_mask(**static)
    assert built is not None and built.shape == (2, 1, 3, WINDOW)
    assert not built[..., 3:].any()
    # The same sizes with a mask function that is not the plain sliding window (here chunked
    # attention, which transformers also sends with local_size): never left out.
    chunked = huggingface.build_mask(
        batch_size=2,
        q_length=10,
        kv_length=10,
        mask_function=chunked_causal_mask_function(WINDOW, torch.zeros(2, dtype=torch.long)),
        local_size=WINDOW,
    )
    assert chunked is not None and not chunked[0, 0, 9, :8].any()


def test_mask_function_is_sdpas_for_full_attention():
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[0, 0] = False
    for sizes in (
        dict(q_length=6, kv_length=6),
        dict(q_length=6, kv_length=6, attention_mask=padding),
    ):
        ours = huggingface.build_mask(batch_size=2, mask_function=causal_mask_function, **sizes)
        theirs = sdpa_mask(batch_size=2, mask_function=causal_mask_function, **sizes)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    assert AttentionMaskInterface()[NAME] is huggingface.build_mask


# --- the attention function against the models' eager functions ----------------------------


class Layer(torch.nn.Module):
    """What the attention functions read from a layer."""

    def __init__(self, groups, sinks=None):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.head_dim = 8
        if sinks is not None:
            self.sinks = torch.nn.Parameter(sinks)


def random_attention_inputs(B=2, H=4, Hkv=2, L=6, S=6, D=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D))
    return [torch.randn(*s, dtype=torch.float64, generator=generator) for s in shapes]


def eager_band(B, L, S, window):
    """transformers' float mask for L queries that are the last L of S positions."""
    band = sdpa_mask(
        batch_size=B,
        q_length=L,
        kv_length=S,
        q_offset=S - L,
        mask_function=sliding_window_causal_mask_function(window),
        allow_is_causal_skip=False,
    )  # (B, 1, L, S) bool
    return torch.zeros(band.shape, dtype=torch.float64).masked_fill(~band, -torch.inf)


@pytest.mark.parametrize("sizes", [(6, 6), (1, 9), (3, 9), (5, 7)], ids=str)
def test_sinks_and_window_equal_gpt_oss_eager(sizes):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    L, S = sizes
    query, key, value = random_attention_inputs(L=L, S=S)
    sinks = torch.randn(4, dtype=torch.float64)
    layer = Layer(2, sinks)
    expected, _ = eager_attention_forward(
        layer, query, key, value, eager_band(2, L, S, WINDOW), scaling=0.3
    )
    actual, _ = huggingface.attention_forward(
        layer, query, key, value, None, scaling=0.3, sliding_window=WINDOW, s_aux=layer.sinks
    )
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


def test_softcap_equals_gemma2_eager_with_a_mask():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    query, key, value = (t * 4 for t in random_attention_inputs(L=5, S=7))
    layer = Layer(2)
    band = eager_band(2, 5, 7, 3)
    expected, _ = eager_attention_forward(layer, query, key, value, band, softcap=2.0)
    actual, _ = huggingface.attention_forward(
        layer, query, key, value, band.isfinite(), softcap=2.0, sliding_window=3
    )
    # eager takes the softmax in float32
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_sink_gradient_flows_through_attention_forward():
    query, key, value = random_attention_inputs(L=4, S=4)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    output, _ = huggingface.attention_forward(
        Layer(2), query, key, value, None, sliding_window=2, s_aux=sinks
    )
    (grad,) = torch.autograd.grad(output.square().sum(), sinks)
    assert grad.shape == (4,) and grad.abs().min() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(indices=torch.zeros(2, 6, 2, dtype=torch.long)), "does not support indices"),
        (dict(block_indices=torch.zeros(2, dtype=torch.long)), "does not support block_indices"),
        (dict(sinks=torch.zeros(2, 4, 6, 1)), r"sinks must be .* shape \(4,\), but has shape"),
        (dict(s_aux=torch.zeros(4), sinks=torch.zeros(4)), "both s_aux and sinks"),
        (dict(sliding_window=0), "sliding_window must be a positive int"),
    ],
    ids=["indices", "block_indices", "per_token_sinks", "both_sinks", "window_0"],
)
def test_what_changes_the_math_and_is_not_implemented_raises(kwargs, message):
    query, key, value = random_attention_inputs()
    with pytest.raises(ValueError, match=message):
        huggingface.attention_forward(Layer(2), query, key, value, None, **kwargs)


# --- whole models against eager --------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_eagers_with_left_padding(name):
    eager, ours = twins(name, torch.float32)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
        actual = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], **tolerance(eager))


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_prefill_logits_equal_eagers(name):
    """No padding: the sliding layers get no mask and the window bottom-right aligned, over
    a first chunk longer than the window and a second that reads the cache."""
    eager, ours = twins(name)
    ids, _ = left_padded_batch(lengths=(13, 13))
    logits = {}
    with torch.no_grad():
        for label, model in (("eager", eager), ("ours", ours)):
            cache = DynamicCache(config=model.config)
            first = model(input_ids=ids[:, :7], cache=cache, use_cache=True).logits
            second = model(input_ids=ids[:, 7:], cache=cache, use_cache=True).logits
            logits[label] = torch.cat([first, second], dim=1)
    torch.testing.assert_close(logits["ours"], logits["eager"], **tolerance(eager))


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_gives_eagers_tokens_with_left_padding(name, cache_implementation):
    eager, ours = twins(name, torch.float32)
    ids, mask = left_padded_batch()
    settings = dict(
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        cache_implementation=cache_implementation,
        output_scores=True,
        return_dict_in_generate=True,
    )
    expected = eager.generate(input_ids=ids, attention_mask=mask, **settings)
    actual = ours.generate(input_ids=ids, attention_mask=mask, **settings)
    assert actual.sequences.shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores)):
        torch.testing.assert_close(a, e, **tolerance(eager), msg=f"scores of step {step}")


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_gradients_equal_eagers(name):
    """Without padding, so in float64 where the model allows it; prompts longer than the
    window."""
    eager, ours = twins(name)
    ids, _ = left_padded_batch(lengths=(11, 11))
    for model in (eager, ours):
        model.train()
        (model(input_ids=ids).logits ** 2).mean().backward()
    compared = []
    for (param_name, p_eager), (_, p_ours) in zip(
        eager.named_parameters(), ours.named_parameters()
    ):
        if p_eager.grad is None:
            assert p_ours.grad is None, param_name
            continue
        torch.testing.assert_close(p_ours.grad, p_eager.grad, **tolerance(eager), msg=param_name)
        compared.append(param_name)
    assert any("k_proj" in n for n in compared)
    if name == "gpt_oss":
        sinks = [n for n in compared if n.endswith("self_attn.sinks")]
        assert len(sinks) == 2
        assert ours.model.layers[0].self_attn.sinks.grad.abs().min() > 0


# --- no band mask for sliding-window layers --------------------------------------------------


def test_sliding_layers_get_no_mask_without_padding_and_a_mask_with_it():
    """Records what each layer's attention call receives: without padding the sliding layers
    get no mask (the kernel applies the window) in prefill and in every decoding step; with
    left padding they get transformers' band while the padding is among their keys."""
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs.get("sliding_window"), attention_mask is None, key.shape[2]))
        return huggingface.attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("qkv_attention_recording", recording)
    AttentionMaskInterface.register("qkv_attention_recording", huggingface.build_mask)
    _, model = twins("mistral")
    model.set_attn_implementation("qkv_attention_recording")
    ids, _ = left_padded_batch(lengths=(9, 9))
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    assert len(seen) == 2 * 4 and all(window == WINDOW for window, _, _ in seen)
    assert all(no_mask for _, no_mask, _ in seen)
    # Decoding steps read the dynamic sliding cache: the window's keys only.
    assert all(keys == WINDOW for _, _, keys in seen[2:])

    seen.clear()
    ids, mask = left_padded_batch(lengths=(9, 3))
    model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert not any(no_mask for _, no_mask, _ in seen[:2])  # prefill: padding among the keys
    # The padding (positions 0-5) has left the window in the last decoding step (its query,
    # position 11, sees 8-11).
    assert all(no_mask for _, no_mask, _ in seen[-2:])

    # A static cache: a prefill as long as the window gets no mask either; its decoding steps
    # get transformers' (B, 1, 1, window) mask, which transformers asks for whenever a cache
    # can be compiled and the query is one token.
    seen.clear()
    ids, _ = left_padded_batch(lengths=(9, 9))
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        cache_implementation="static",
        **settings,
    )
    assert all(no_mask for _, no_mask, _ in seen[:2])
    assert not any(no_mask for _, no_mask, _ in seen[2:])


def test_padded_sliding_layers_still_give_the_window_to_the_operator(monkeypatch):
    """With padding among the keys the band mask is built, marked by build_mask, and the
    window goes to the operator beside it (so its kernel skips the key blocks outside it); a
    mask that is not build_mask's (here a copy) is used alone, with the same result."""
    calls = []

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((kwargs.get("window_size"), key.shape[2], attn_mask is not None))
        return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(huggingface, "scaled_dot_product_attention", recording)
    ids, mask = left_padded_batch(lengths=(11, 7, 3))
    _, model = twins("mistral", torch.float32)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == [((WINDOW - 1, 0), 11, True)] * 2

    band = huggingface.build_mask(
        batch_size=3,
        q_length=11,
        kv_length=11,
        mask_function=sliding_window_causal_mask_function(WINDOW),
        attention_mask=mask.bool(),
        local_size=WINDOW,
    )
    query, key, value = random_attention_inputs(B=3, L=11, S=11)
    calls.clear()
    marked, _ = huggingface.attention_forward(
        Layer(2), query, key, value, band, sliding_window=WINDOW
    )
    copied, _ = huggingface.attention_forward(
        Layer(2), query, key, value, band.clone(), sliding_window=WINDOW
    )
    assert [window for window, _, _ in calls] == [(WINDOW - 1, 0), None]
    torch.testing.assert_close(marked, copied, atol=1e-12, rtol=1e-12)
