"""Emu3 and Janus adapters on tiny random float64 configs (offline): image-only logits against the
models' own forwards and heads, greedy decoding against the models' own ``generate`` (Emu3 with its
row-end layout and a negative prompt, Janus with its masked unconditional prompt), the lossless
methods and Gumbel-Jacobi against AR, and bad inputs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sjd_kernels.decoding import generate                                    # noqa: E402
from sjd_kernels.decoding.methods import available_methods                  # noqa: E402
from sjd_kernels.models import check_model                                   # noqa: E402
from sjd_kernels.models import hf as hfa                                     # noqa: E402
from sjd_kernels.ops import SJDInputError                                    # noqa: E402

HAS_EMU3 = hasattr(transformers, "Emu3ForConditionalGeneration")
HAS_JANUS = hasattr(transformers, "JanusForConditionalGeneration")
need_emu3 = pytest.mark.skipif(not HAS_EMU3, reason=f"transformers {transformers.__version__} has no Emu3")
need_janus = pytest.mark.skipif(not HAS_JANUS, reason=f"transformers {transformers.__version__} has no Janus")

LOSSLESS = [m for m in ("ar", "sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi", "pac")
            if m in available_methods()]
TEXT = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISUAL = list(range(8, 24))                      # Emu3: visual token k is id 8 + k
EOL, EOF, EOI, IMG_TOKEN = 30, 31, 29, 4
BOI = 38                                         # Janus <begin_of_image>


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def emu3_vocab_map(visual=VISUAL, eol=True):
    vm = {"<image>": 3, "<|image token|>": IMG_TOKEN, "<|image end|>": EOI, "<|extra_201|>": EOF,
          **{"<|visual token%06d|>" % k: t for k, t in enumerate(visual)}}
    if eol:
        vm["<|extra_200|>"] = EOL
    return vm


def emu3(attn="sdpa", seed=0, vocab_map=None):
    torch.manual_seed(seed)
    vm = emu3_vocab_map() if vocab_map is None else vocab_map
    cfg = transformers.Emu3Config(
        text_config=dict(TEXT), vocabulary_map=vm,
        vq_config=dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1],
                       num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1,
                       temporal_downsample_factor=1))
    cfg._attn_implementation = attn
    m = transformers.Emu3ForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)                  # spread the logits so greedy paths vary
    return m


def janus(attn="sdpa", seed=0, V=24, boi=True):
    torch.manual_seed(seed)
    cfg = transformers.JanusConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4, projection_dim=32, num_image_tokens=16),
        vq_config=dict(embed_dim=4, num_embeddings=V, latent_channels=32, base_channels=32, channel_multiplier=[1],
                       num_res_blocks=1, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=2),
        image_token_id=39)
    cfg._attn_implementation = attn
    m = transformers.JanusForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():                            # spread embeddings and logits so greedy paths vary
        m.model.generation_embeddings.weight.mul_(50.0)
        for p in m.model.generation_aligner.parameters():
            p.mul_(3.0)
        m.model.generation_head.vision_head.weight.mul_(50.0)
    if boi:
        m.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return m


# ---------------------------------------------------------------- Emu3
@need_emu3
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_emu3_image_logits(attn):
    hf = emu3(attn)
    assert hfa.emu3_image_ids(hf) == VISUAL
    a = hfa.from_emu3(hf, uncond_prompt=[1, IMG_TOKEN])
    check_model(a)
    assert a._attn_impl == attn and a.vocab_size == 16 and a.num_extra_tokens == 3
    assert a.extra_ids.tolist() == [EOL, EOF, EOI]
    assert a.image_head()[0].data_ptr() == hf.lm_head.weight[8].data_ptr()      # a view of the head rows
    seq = torch.tensor([[1, 5, 9, 30, 12, IMG_TOKEN]])
    with torch.no_grad():
        own = hf(input_ids=seq).logits                   # Emu3's forward does not mask: compare directly
        got = a(hf.get_input_embeddings()(seq), torch.arange(6)[None])
        codes = torch.tensor([[0, 5, 15, 16, 17, 18]])   # image codes and the three structural codes
        assert torch.equal(a.embed_tokens(codes), hf.get_input_embeddings()(torch.tensor([[8, 13, 23, EOL, EOF, EOI]])))
    assert got.shape == (1, 6, 16) and torch.allclose(got, own[..., 8:24], atol=1e-12)


def emu3_layout_fn(prompt_len, H, W):
    """Emu3's ``prefix_allowed_tokens_fn`` (visual tokens, EOL after each row, then EOF, image end)."""
    def fn(batch_id, x):
        off = x.shape[0] - prompt_len
        if off < H * (W + 1):
            return [EOL] if off % (W + 1) == W else VISUAL
        return [EOF] if off == H * (W + 1) else [EOI] if off == H * (W + 1) + 1 else [0]
    return fn


@need_emu3
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_emu3_greedy_matches_hf_generate(cfg_scale):
    hf = emu3()
    a = hfa.from_emu3(hf)
    H, W = 3, 4
    forced = hfa.emu3_forced(2, H, W, a.vocab_size)
    N = forced.shape[1]
    assert N == H * (W + 1) + 2 and forced[0].tolist() == ([-1] * 4 + [16]) * 3 + [17, 18]
    cond = torch.tensor([[1, 5, 6, 7, IMG_TOKEN], [1, 9, 9, 12, IMG_TOKEN]])
    neg = torch.tensor([[1, 2, 2, 2, IMG_TOKEN]] * 2)                 # Emu3's negative prompt as the CFG row
    kw = dict(guidance_scale=cfg_scale, negative_prompt_ids=neg, negative_prompt_attention_mask=torch.ones_like(neg))
    with torch.no_grad():
        ref = hf.generate(input_ids=cond, attention_mask=torch.ones_like(cond), max_new_tokens=N, do_sample=False,
                          prefix_allowed_tokens_fn=emu3_layout_fn(cond.shape[1], H, W),
                          **(kw if cfg_scale != 1.0 else {}))[:, cond.shape[1]:]
    table = torch.tensor(VISUAL + [EOL, EOF, EOI])
    uncond = neg if cfg_scale != 1.0 else None
    for method in LOSSLESS:
        out = generate(a, cond, N, method, window=4, top_k=1, cfg_scale=cfg_scale, uncond=uncond, forced=forced,
                       seed=3)
        assert torch.equal(table[out.tokens], ref), method
    g1 = generate(a, cond, N, "ar_gumbel", cfg_scale=cfg_scale, uncond=uncond, forced=forced, seed=5)
    g2 = generate(a, cond, N, "gumbel_jacobi", window=6, cfg_scale=cfg_scale, uncond=uncond, forced=forced, seed=5)
    assert torch.equal(g1.tokens, g2.tokens)
    free = forced[0] < 0
    assert (g1.tokens[:, ~free] == forced[:, ~free]).all() and (g1.tokens[:, free] < 16).all()


# ---------------------------------------------------------------- Janus
@need_janus
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_janus_embeddings_and_logits(attn):
    hf = janus(attn)
    a = hfa.from_janus(hf)
    check_model(a)
    assert a._attn_impl == attn and a.vocab_size == 24 and a.num_extra_tokens == 0
    assert a.max_image_tokens == 16                          # vision_config.num_image_tokens
    assert a.uncond_pad_token_id == 0 and a.uncond_keep_ids == [1, BOI]
    codes = torch.tensor([[0, 7, 23]])
    with torch.no_grad():
        assert torch.equal(a.embed_tokens(codes), hf.prepare_embeddings_for_image_generation(codes))
        prompt = torch.tensor([[1, 5, 9, BOI]])
        emb = torch.cat([hf.get_input_embeddings()(prompt), hf.prepare_embeddings_for_image_generation(codes)], 1)
        got = a(emb, torch.arange(7)[None])
        h = hf.model(inputs_embeds=emb).last_hidden_state     # Janus generates with generation_head, not lm_head
        want = hf.model.generation_head(h)
    assert got.shape == (1, 7, 24) and torch.allclose(got, want, atol=1e-12)
    with pytest.raises(NotImplementedError, match="MLP"):
        a.image_head()


@need_janus
@pytest.mark.parametrize("cfg_scale", [2.0, 5.0])
def test_janus_greedy_matches_hf_generate(cfg_scale):
    hf = janus()
    a = hfa.from_janus(hf)
    cond = torch.tensor([[1, 5, 6, 7, BOI], [1, 9, 9, 12, BOI]])
    with torch.no_grad():                                     # Janus's own loop: CFG rows masked to BOS, PAD.., BOI
        ref = hf.generate(input_ids=cond, attention_mask=torch.ones_like(cond), generation_mode="image",
                          do_sample=False, guidance_scale=cfg_scale)
    assert ref.shape == (2, 16) and len(set(ref.flatten().tolist())) > 3
    assert [u.tolist() for u in a.uncond_of(cond)] == [[1, 0, 0, 0, BOI]] * 2
    for method in LOSSLESS:
        out = generate(a, cond, 16, method, window=4, top_k=1, cfg_scale=cfg_scale, seed=3)
        assert torch.equal(out.tokens, ref), method


def janus_reference(hf, cond, uncond, N, cfg_scale):
    """Greedy CFG with the model's own modules and full forwards (no cache)."""
    out = []
    for b in range(len(cond)):
        codes = []
        for _ in range(N):
            hs = []
            for prompt in (cond[b], uncond[b]):
                emb = hf.get_input_embeddings()(torch.tensor([prompt]))
                if codes:
                    emb = torch.cat([emb, hf.prepare_embeddings_for_image_generation(torch.tensor([codes]))], 1)
                hs.append(hf.model.generation_head(hf.model(inputs_embeds=emb).last_hidden_state[0, -1]))
            c, u = hs
            codes.append(int(torch.argmax(u + cfg_scale * (c - u))))
        out.append(codes)
    return torch.tensor(out)


@torch.no_grad()
@need_janus
def test_janus_ragged_prompts_and_gumbel_jacobi():
    hf = janus(seed=1)
    a = hfa.from_janus(hf)
    cond = [[1, 5, BOI], [1, 7, 8, 9, 11, BOI], [1, 3, 3, BOI]]       # ragged prompts, masked CFG rows
    uncond = [[1, 0, BOI], [1, 0, 0, 0, 0, BOI], [1, 0, 0, BOI]]
    ref = janus_reference(hf, cond, uncond, 10, 3.0)
    for method in LOSSLESS:
        out = generate(a, cond, 10, method, window=4, top_k=1, cfg_scale=3.0, seed=2)
        assert torch.equal(out.tokens, ref), method
    explicit = generate(a, cond, 10, "sjd", window=3, top_k=1, cfg_scale=3.0, uncond=[[1, BOI]] * 3)
    assert explicit.tokens.shape == (3, 10)                     # explicit uncond prompts of another length
    for cfg_scale in (1.0, 4.0):
        g1 = generate(a, cond, 16, "ar_gumbel", cfg_scale=cfg_scale, seed=7)
        g2 = generate(a, cond, 16, "gumbel_jacobi", window=5, cfg_scale=cfg_scale, seed=7)
        assert torch.equal(g1.tokens, g2.tokens) and (g1.tokens < 24).all()


# ---------------------------------------------------------------- bad inputs
@need_emu3
def test_emu3_errors():
    with pytest.raises(ValueError, match="distinct ids"):             # visual ids outside the text vocabulary
        hfa.from_emu3(emu3(vocab_map=emu3_vocab_map(visual=list(range(30, 46)))))
    with pytest.raises(ValueError, match="lacks"):                    # no EOL in the vocabulary map
        hfa.from_emu3(emu3(vocab_map=emu3_vocab_map(eol=False)))
    hf = emu3(vocab_map=emu3_vocab_map(eol=False))
    a = hfa.from_emu3(hf, extra_token_ids=[27])                       # explicit row end: code 16 only
    with pytest.raises(SJDInputError, match="forced ids must be"):
        generate(a, [[1, IMG_TOKEN]], 7, "sjd", forced=hfa.emu3_forced(1, 1, 4, a.vocab_size))
    with pytest.raises(ValueError, match="extra_token_ids must lie"):
        hfa.from_emu3(hf, extra_token_ids=[40])
    vm = emu3_vocab_map()
    vm["<|visual token000020|>"] = vm.pop("<|visual token000015|>")    # codes 0..14, 20: a gap
    with pytest.raises(ValueError, match="not 0..K-1"):
        hfa.emu3_image_ids(emu3(vocab_map=vm))
    with pytest.raises(TypeError, match="vocabulary_mapping"):
        hfa.from_emu3(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)))
    with pytest.raises(ValueError, match="outside"):
        generate(hfa.from_emu3(emu3()), [[1, 40]], 4, "sjd")


@need_janus
def test_janus_errors():
    hf = janus(boi=False)
    hf.generation_config.pad_token_id = None
    a = hfa.from_janus(hf)
    with pytest.raises(SJDInputError, match="CFG needs unconditional prompts"):
        generate(a, [[1, 5, BOI]], 4, "sjd", cfg_scale=2.0)
    assert generate(a, [[1, 5, BOI]], 4, "sjd", cfg_scale=2.0, uncond=[[1, BOI]], top_k=1).tokens.shape == (1, 4)
    with pytest.raises(SJDInputError, match="exceeds the model's max_image_tokens 16"):
        generate(a, [[1, BOI]], 17, "sjd")
    with pytest.raises(SJDInputError, match="forced ids must be"):    # no structural tokens in Janus
        generate(a, [[1, BOI]], 4, "sjd", forced=torch.full((1, 4), 24))
    with pytest.raises(ValueError, match="must lie in"):
        hfa.from_janus(hf, uncond_pad_token_id=40)
    hf = janus()
    hf.model.generation_embeddings = torch.nn.Embedding(25, 4).double()      # 25 codes in, 24 out
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        hfa.from_janus(hf)
    hf = janus()
    hf.model.generation_head.proj_out = torch.nn.Linear(16, 32).double()
    with pytest.raises(ValueError, match="hidden size mismatch"):
        hfa.from_janus(hf)
    with pytest.raises(TypeError, match="not a Janus model"):
        hfa.from_janus(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)))
