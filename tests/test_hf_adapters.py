"""Hugging Face adapters on tiny random configs (offline): image-only logits, the per-row KV cache
bridge, prompts of different lengths, CFG, forced structural tokens, and the decoding oracles."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import sjd_kernels as sk                                                     # noqa: E402
from sjd_kernels.decoding import generate                                    # noqa: E402
from sjd_kernels.models import check_model                                   # noqa: E402
from sjd_kernels.models.hf import HFImageLM, chameleon_image_ids, from_chameleon, grid_forced  # noqa: E402

WINDOWED = ["sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    m = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)                  # spread the logits so greedy paths vary
    return m


def chameleon(seed=0, V=16):
    torch.manual_seed(seed)
    name = lambda k: "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z"   # noqa: E731
    vocab_map = {"<image>": 3, **{name(k): 4 + k for k in range(V)}}
    cfg = transformers.ChameleonConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocabulary_map=vocab_map,
        vq_config=dict(embed_dim=4, num_embeddings=V, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                       attn_resolutions=[], latent_channels=4, resolution=8, in_channels=3))
    m = transformers.ChameleonForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m


def greedy_reference(hf, image_ids, cond, uncond, N, cfg_scale, extra=(), forced=None):
    """Greedy CFG decoding with the model's own full forward (no cache), image ids only."""
    image_ids = torch.as_tensor(image_ids)
    table = torch.cat([image_ids, torch.as_tensor(list(extra), dtype=torch.int64)])
    out = []
    for b, prompt in enumerate(cond):
        codes = []
        for i in range(N):
            if forced is not None and forced[b, i] >= 0:
                codes.append(int(forced[b, i]))
                continue
            gen = [int(table[c]) for c in codes]
            with torch.no_grad():
                h = hf.get_decoder()(input_ids=torch.tensor([list(prompt) + gen])).last_hidden_state[0, -1]
                c = hf.get_output_embeddings()(h)        # Chameleon masks image logits in its forward
                x = c[image_ids]
                if cfg_scale != 1.0:
                    hu = hf.get_decoder()(input_ids=torch.tensor([list(uncond[b]) + gen])).last_hidden_state[0, -1]
                    u = hf.get_output_embeddings()(hu)[image_ids]
                    x = u.float() + cfg_scale * (x.float() - u.float())
            codes.append(int(torch.argmax(x.float())))
        out.append(codes)
    return torch.tensor(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_logits_and_greedy(attn):
    hf = llama(attn)
    ids = list(range(8, 24))
    a = HFImageLM(hf, ids, uncond_prompt=[1])
    check_model(a)
    assert a._attn_impl == attn and a.vocab_size == 16 and a.num_layers == 2 and a.num_kv_heads == 2 and a.head_dim == 8
    seq = torch.tensor([[1, 5, 9, 30, 12]])
    with torch.no_grad():
        want = hf(input_ids=seq).logits[..., 8:24]
        got = a(hf.get_input_embeddings()(seq), torch.arange(5)[None])
    assert torch.allclose(got, want, atol=1e-12)
    assert a.image_head()[0].data_ptr() == hf.lm_head.weight[8].data_ptr()     # a view, no copy
    cond = [[1, 5, 6], [1, 7], [2, 3, 4, 5]]                                     # ragged prompts
    uncond = [[1], [1, 2], [1]]
    ref = greedy_reference(hf, ids, cond, uncond, 10, 2.0)
    ar = generate(a, cond, 10, "ar", top_k=1, cfg_scale=2.0, uncond=uncond)
    assert ar.stats.nfe_prefill == 1
    assert torch.equal(ar.tokens, ref)
    for method in WINDOWED:
        out = generate(a, cond, 10, method, window=4, top_k=1, cfg_scale=2.0, uncond=uncond, seed=3)
        assert torch.equal(out.tokens, ref), method
    g1 = generate(a, cond, 10, "ar_gumbel", cfg_scale=2.0, uncond=uncond, seed=5)
    g2 = generate(a, cond, 10, "gumbel_jacobi", window=6, cfg_scale=2.0, uncond=uncond, seed=5)
    assert torch.equal(g1.tokens, g2.tokens)


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_families_that_scale_their_logits(family):
    """Granite divides the head's output by config.logits_scaling, Cohere multiplies it by
    config.logit_scale, Gemma2 soft-caps it: the image logits are the model's own (the adapter
    returned Granite's and Cohere's unscaled, a 4x and a 1/16x temperature change)."""
    common = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "granite":
        hf = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=4.0))
    elif family == "cohere":
        hf = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.0625))
    else:
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5)
        cfg._attn_implementation = "eager"
        hf = transformers.Gemma2ForCausalLM(cfg)
    hf = hf.double().eval()
    a = HFImageLM(hf, list(range(8, 24)))
    assert (a._logit_mult is None) == (family == "gemma2")
    seq = torch.tensor([[1, 5, 9, 30, 12]])
    with torch.no_grad():
        want = hf(input_ids=seq).logits[..., 8:24]
        got = a(hf.get_input_embeddings()(seq), torch.arange(5)[None])
    assert torch.allclose(got, want, atol=1e-12), (got - want).abs().max()


def test_non_contiguous_image_ids():
    hf = llama(seed=1)
    ids = [30, 2, 17, 9, 11, 25, 4, 38]
    a = HFImageLM(hf, ids)
    seq = torch.tensor([[1, 5, 9, 30, 12]])
    with torch.no_grad():
        want = hf(input_ids=seq).logits[..., ids]
        got = a(hf.get_input_embeddings()(seq), torch.arange(5)[None])
        emb = hf.get_input_embeddings()(torch.tensor([[30, 17, 38]]))
        assert torch.equal(a.embed_tokens(torch.tensor([[0, 2, 7]])), emb)
    assert torch.allclose(got, want, atol=1e-12)
    ref = greedy_reference(hf, ids, [[1, 2]], None, 8, 1.0)
    assert torch.equal(generate(a, [[1, 2]], 8, "sjd", window=3, top_k=1).tokens, ref)


def test_chameleon_image_logits_and_forced_row_ends():
    hf = chameleon()
    ids = chameleon_image_ids(hf)
    assert ids == list(range(4, 20))
    a = from_chameleon(hf, extra_token_ids=[30], uncond_prompt=[0])
    seq = torch.tensor([[0, 1, 2, 5, 6]])
    with torch.no_grad():
        own = hf(input_ids=seq).logits[..., 4:20]
        got = a(hf.get_input_embeddings()(seq), torch.arange(5)[None])
        h = hf.get_decoder()(input_ids=seq).last_hidden_state
    assert (own == torch.finfo(own.dtype).min).all()          # the model's own forward masks image logits
    assert torch.allclose(got, hf.lm_head(h)[..., 4:20], atol=1e-12) and got.isfinite().all()
    forced = grid_forced(2, 3, 4, a.vocab_size)                # 3 rows of 4 codes + a row end (code 16 = id 30)
    cond, uncond = [[0, 1], [0, 2, 1]], [[0], [0]]
    ref = greedy_reference(hf, ids, cond, uncond, forced.shape[1], 3.0, extra=[30], forced=forced)
    assert (ref[:, 4::5] == 16).all()
    for method in ["ar"] + WINDOWED:
        out = generate(a, cond, forced.shape[1], method, window=4, top_k=1, cfg_scale=3.0, uncond=uncond,
                       forced=forced)
        assert torch.equal(out.tokens, ref), method
    s = generate(a, cond, forced.shape[1], "coupling", window=4, cfg_scale=3.0, forced=forced, seed=2)
    assert (s.tokens[:, 4::5] == 16).all() and (s.tokens[:, torch.arange(15) % 5 != 4] < 16).all()


def test_adapter_errors():
    hf = llama()
    with pytest.raises(ValueError, match="distinct ids"):
        HFImageLM(hf, [3, 3, 4])
    with pytest.raises(ValueError, match="distinct ids"):
        HFImageLM(hf, [38, 39, 40])
    a = HFImageLM(hf, list(range(8, 24)))
    from sjd_kernels.ops import SJDInputError
    with pytest.raises(SJDInputError, match="CFG needs unconditional prompts"):
        generate(a, [[1, 2]], 4, "sjd", cfg_scale=2.0)
    with pytest.raises(SJDInputError, match="one prompt per request"):
        generate(a, [[1, 2], [1, 3]], 4, "sjd", cfg_scale=2.0, uncond=[[1]])
    with pytest.raises(SJDInputError, match="outside"):
        generate(a, [[1, 99]], 4, "sjd")
    with pytest.raises(SJDInputError, match="is empty"):
        generate(a, [[]], 4, "sjd")
    with pytest.raises(SJDInputError, match="forced ids must be"):
        generate(a, [[1]], 4, "sjd", forced=torch.full((1, 4), 16))          # no extra tokens declared


def sliding(family, window, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=window)
    if family == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:                                                # Qwen2: layer 0 full, layer 1 sliding
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=True,
                                                                   max_window_layers=1))
    m = m.double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_models(family):
    """Models whose layers attend within a sliding window (every layer: Mistral; some: Qwen2 with
    layer_types) decode like the model itself while the cache fits in the window, and are refused
    with the window named when it does not (the per-row masks would let them see past it)."""
    ids = list(range(8, 24))
    hf = sliding(family, 32)
    a = HFImageLM(hf, ids)
    assert a.sliding_window == 32 and a._sliding == ([True, True] if family == "mistral" else [False, True])
    cond = [[1, 5, 6], [1, 7]]
    ref = greedy_reference(hf, ids, cond, None, 10, 1.0)
    assert torch.equal(generate(a, cond, 10, "ar", top_k=1).tokens, ref)
    assert torch.equal(generate(a, cond, 10, "sjd", window=4, top_k=1).tokens, ref)
    small = HFImageLM(sliding(family, 6), ids)
    n = 2 if family == "mistral" else 1
    with pytest.raises(sk.SJDInputError, match=rf"{n} of the model's 2 layers attend within a sliding window of 6"):
        generate(small, cond, 10, "ar", top_k=1)


def test_unsupported_layer_types_are_refused():
    hf = llama()
    hf.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(sk.SJDInputError, match=r"layer types \['chunked_attention'\] are not supported"):
        HFImageLM(hf, list(range(8, 24)))


def test_alibi_models_are_refused():
    """Bloom builds its ALiBi bias from a 2-D padding mask: the adapter's per-row 4-D masks crashed
    inside transformers at the first cached forward."""
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=40, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(sk.SJDInputError, match="ALiBi attention is not supported"):
        HFImageLM(hf.double().eval(), list(range(8, 24)))


def test_learned_position_tables_bound_the_cache():
    """GPT-2 adds a learned table of n_positions: within it the adapter gives the model's logits and
    greedy decoding; a position past the table is a named error (it was an IndexError inside the
    model, a device assert on a GPU)."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4,
                                                              n_positions=24)).double().eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)
    ids = list(range(8, 24))
    a = HFImageLM(hf, ids)
    assert a._pos_limit == 24
    seq = torch.tensor([[1, 5, 9, 30, 12]])
    with torch.no_grad():
        want = hf(input_ids=seq).logits[..., 8:24]
        got = a(hf.get_input_embeddings()(seq), torch.arange(5)[None])
    assert torch.allclose(got, want, atol=1e-12)
    ref = greedy_reference(hf, ids, [[1, 5, 9]], None, 8, 1.0)
    assert torch.equal(generate(a, [[1, 5, 9]], 8, "sjd", window=3, top_k=1).tokens, ref)
    with pytest.raises(sk.SJDInputError, match="learned table of 24 positions, and this forward feeds position 24"):
        generate(a, [[1, 5, 9]], 23, "ar", top_k=1)
    # on the CPU the positions fed are checked, not the cache's length: AR never feeds its last token, so
    # 3 + 22 tokens fit a table of 24; a window of 4 feeds positions up to 3 + N + 4 - 2 (its fixed-shape
    # rows run past the image), so N = 18 fits, and a cache_len past the table is fine
    ref22 = greedy_reference(hf, ids, [[1, 5, 9]], None, 22, 1.0)
    assert torch.equal(generate(a, [[1, 5, 9]], 22, "ar", top_k=1).tokens, ref22)
    assert torch.equal(generate(a, [[1, 5, 9]], 18, "sjd", window=4, top_k=1, cache_len=40).tokens, ref22[:, :18])
    with pytest.raises(sk.SJDInputError, match="feeds position 24"):
        generate(a, [[1, 5, 9]], 19, "sjd", window=4, top_k=1, cache_len=40)
    assert torch.equal(generate(a, [[1, 5, 9]], 8, "sjd", window=3, top_k=1, cache_len=40).tokens, ref)
