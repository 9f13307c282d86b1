"""Bad inputs to the model-side public API (GPT, Hugging Face adapters, StaticKVCache, tokenizer, quality
measure, data sets, SJD2 training pieces, bundled model names): each is an SJDInputError (or the module's
own error type) whose message starts with the argument's name, raised before anything is modified."""
import numpy as np
import pytest
import torch

from sjd_kernels import data
from sjd_kernels.decoding.cache import StaticKVCache
from sjd_kernels.models import GPT, GPTConfig, bundled, check_model, drop_condition
from sjd_kernels.models.tokenizer import PatchVQ
from sjd_kernels.ops import SJDInputError
from sjd_kernels.quality import QualityModel, TinyCNN, frechet_distance
from sjd_kernels.sjd2 import checkpoint
from sjd_kernels.sjd2.noise import (EmbedNorm, LevelEmbedding, NoiseSchedule, SJD2Embedding, position_noise,
                                    sample_segment_levels)
from sjd_kernels.sjd2.train import next_clean_token_loss, noisy_image_inputs

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def tiny_gpt(cond_dim=None):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, n_layer=2, n_head=2, d_model=16, max_image_tokens=8, num_classes=3,
                         cond_dim=cond_dim)).eval()


def filled_cache():
    """2 layers, 2 rows, 1 KV head, 4 slots, head_dim 2; random contents, lengths [1, 2]."""
    c = StaticKVCache(2, 2, 1, 4, 2)
    c.kv.copy_(torch.randn(c.kv.shape, generator=torch.Generator().manual_seed(0)))
    c.set_lengths(torch.tensor([1, 2]))
    return c


def snapshot(cache):
    return cache.kv.clone(), cache.lengths.clone()


def unchanged(cache, snap):
    return torch.equal(cache.kv, snap[0]) and torch.equal(cache.lengths, snap[1])


# ------------------------------------------------------------------------------ StaticKVCache
@pytest.mark.parametrize("kw,name", [(dict(layers=2.0), "layers"), (dict(rows=True), "rows"),
                                     (dict(max_len="4"), "max_len"), (dict(dtype=torch.int64), "dtype")])
def test_cache_constructor(kw, name):
    args = dict(layers=2, rows=1, kv_heads=1, max_len=4, head_dim=2) | kw
    dtype = args.pop("dtype", torch.float32)
    with pytest.raises(SJDInputError, match=f"^{name} must"):
        StaticKVCache(*args.values(), dtype=dtype)


ONES = torch.ones(2, 1, 2, 2)
SLOTS = torch.tensor([[0, 1], [0, 1]])


@pytest.mark.parametrize("layer,k,v,slots,name", [
    (-1, ONES, ONES, SLOTS, "layer"),                                   # used to write layer 1
    (2, ONES, ONES, SLOTS, "layer"),
    (0, ONES, ONES, torch.tensor([[0, -1], [0, 1]]), "slots"),          # used to write part, then raise
    (0, ONES, ONES, torch.tensor([[0, 4], [0, 1]]), "slots"),           # past max_len 4
    (0, ONES, ONES, SLOTS.float(), "slots"),
    (0, ONES, ONES, SLOTS[0], "slots"),
    (0, ONES, torch.ones(2, 1, 3, 2), SLOTS, "v"),                      # used to write 2 of v's 3 steps
    (0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), SLOTS[:1], "k"),  # used to write row 0 only
    (0, torch.ones(2, 1, 2, 1), torch.ones(2, 1, 2, 1), SLOTS, "k"),    # used to write half of head_dim
])
def test_cache_write_checks_before_writing(layer, k, v, slots, name):
    c = filled_cache()
    snap = snapshot(c)
    with pytest.raises(SJDInputError, match=f"^{name} must"):
        c.write(layer, k, v, slots)
    assert unchanged(c, snap)


def test_cache_layer_index():
    with pytest.raises(SJDInputError, match="^layer must"):
        filled_cache().layer(-1)                                        # used to return the last layer


@pytest.mark.parametrize("bad", [torch.tensor([5, 0]), torch.tensor([-1, 0]), torch.tensor([1.7, 0.0]),
                                 torch.tensor(2), torch.tensor([1, 2, 3]), [1, 2]],
                         ids=["past_max_len", "negative", "float", "0-d", "3_rows", "list"])
def test_cache_set_lengths(bad):
    c = filled_cache()
    snap = snapshot(c)
    with pytest.raises(SJDInputError, match="^lengths must"):
        c.set_lengths(bad)
    assert unchanged(c, snap)


@pytest.mark.parametrize("T,msg", [(2, "T=2 runs past"), (1.5, "T must"), (-1, "T must")])
def test_cache_window(T, msg):
    c = filled_cache()
    c.set_lengths(torch.tensor([3, 0]))
    with pytest.raises(SJDInputError, match=f"^{msg}"):                  # T=2: slots [3, 4], a mask cut at 4
        c.window(T)
    slots, mask = c.window_mask(2)                                      # clamps by design (discarded rows)
    assert slots.tolist() == [[3, 3], [0, 1]] and mask.shape == (2, 2, 4)


# ------------------------------------------------------------------------------ GPT
@pytest.mark.parametrize("kw,name", [
    (dict(num_classes=-1), "num_classes"), (dict(cond_dim=0), "cond_dim"), (dict(rope_base=0.0), "rope_base"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio"), (dict(norm_eps=-1.0), "norm_eps"), (dict(vocab_size=True), "vocab_size"),
    (dict(grid_width=2.0), "grid_width"), (dict(dropout="0.1"), "dropout")])
def test_gpt_config(kw, name):
    with pytest.raises(SJDInputError, match=rf"^GPTConfig\.{name} must"):
        GPTConfig(**(dict(vocab_size=16) | kw))


@pytest.mark.parametrize("call,msg", [
    (lambda m: m.prefix("abc", False), "cond must"),
    (lambda m: m.prefix(None, False), "cond must"),
    (lambda m: m.prefix(torch.tensor([1]), True, torch.tensor([7])), "uncond: class ids must be in"),
    (lambda m: tiny_gpt(cond_dim=4).prefix(torch.tensor([[0.0, float("inf"), 0.0, 0.0]]), False), "cond holds infinite"),
    (lambda m: tiny_gpt(cond_dim=4).prefix(torch.tensor([[1.0] * 4, [0.0, float("nan"), 0.0, 0.0]]), False),
     r"cond rows \[1\] hold NaN in some entries only"),                # was silently the null condition
    (lambda m: m.embed_tokens(torch.tensor([[16]])), "ids must"),
    (lambda m: m.embed_tokens(torch.tensor([[-1, 2]])), "ids must"),
    (lambda m: m.embed_tokens(torch.tensor([[1.0]])), "ids must"),
    (lambda m: m.null_condition(-1), "batch must"),
    (lambda m: drop_condition(torch.tensor([1, 2]), float("nan"), 3), "p must"),    # NaN: never dropped
    (lambda m: drop_condition(torch.tensor([1, 2]), 2.0, 3), "p must"),             # 2: always dropped
    (lambda m: drop_condition([1, 2], 0.5, 3), "cond must"),
], ids=["cond_str", "cond_none", "uncond_class", "cond_inf", "cond_partial_nan", "id_V", "id_neg", "id_float", "null_batch", "p_nan",
        "p_2", "drop_list"])
def test_gpt_conditions_and_ids(call, msg):
    with pytest.raises(SJDInputError, match=f"^{msg}"):
        call(tiny_gpt())


def test_a_row_of_nan_only_is_the_null_condition():
    m = tiny_gpt(cond_dim=4)
    e = m.embed_cond(torch.tensor([[float("nan")] * 4, [0.5, 0.0, 1.0, 2.0]]))
    assert torch.equal(e[0, 0], m.null_cond.detach()) and not torch.equal(e[1, 0], m.null_cond.detach())
    assert torch.equal(m.embed_cond(m.null_condition(2)), m.null_cond.detach().expand(2, 1, -1))


X = torch.randn(1, 3, 16)
POS = torch.arange(3).view(1, 3)


@pytest.mark.parametrize("kw,name", [
    (dict(inputs_embeds=torch.randn(1, 3, 8)), "inputs_embeds"),
    (dict(inputs_embeds=X.double()), "inputs_embeds"),
    (dict(positions=POS.float()), "positions"),                         # used to rotate by the float values
    (dict(positions=torch.arange(4).view(1, 4)), "positions"),
    (dict(mask=torch.ones(1, 3, 3)), "mask"),                           # a float mask is added, not a selection
    (dict(mask=torch.ones(1, 3, 4, dtype=torch.bool)), "mask"),
    (dict(write_slots=POS), "write_slots"),
])
def test_gpt_forward_arguments(kw, name):
    args = dict(inputs_embeds=X, positions=POS) | kw
    with pytest.raises(SJDInputError, match=f"^{name} "):
        tiny_gpt()(**args)


FULL = torch.ones(1, 3, 8, dtype=torch.bool)


@pytest.mark.parametrize("layers,heads,S,slots,mask,name", [
    (2, 2, 8, POS, None, "write_slots and mask"),                      # no mask: attended from slot 0 on
    (2, 2, 8, None, FULL, "write_slots and mask"),
    (1, 2, 8, POS, FULL, "cache has shape"),                           # wrote layer 0, then IndexError
    (2, 1, 8, POS, FULL, "cache has shape"),
    (2, 2, 4, POS + 2, FULL[..., :4], "write_slots must"),             # slot 4 of 4
    (2, 2, 8, POS, FULL[..., :3], "mask must"),
], ids=["no_mask", "no_slots", "layers", "kv_heads", "slot_past_S", "mask_S"])
def test_gpt_forward_with_cache_refused_before_writing(layers, heads, S, slots, mask, name):
    c = StaticKVCache(layers, 1, heads, S, 8)
    snap = snapshot(c)
    with pytest.raises(SJDInputError, match=f"^{name}"):
        tiny_gpt()(X, POS if slots is None else slots, cache=c, mask=mask, write_slots=slots)
    assert unchanged(c, snap)


TOK = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize("kw,msg", [
    (dict(tokens=TOK[0]), "tokens must be 2-D"), (dict(tokens=TOK[:, :0]), "tokens must hold"),
    (dict(tokens=TOK.float()), "tokens must have dtype"), (dict(cond=torch.tensor([1, 2])), "cond must have one"),
    (dict(image_embeds=torch.randn(1, 5, 16)), "image_embeds must have shape"),
    (dict(tokens=torch.tensor([[1, 16, 3]])), "ids must be image codes")],
    ids=["tokens_1d", "tokens_empty", "tokens_float", "cond_rows", "image_embeds", "token_V"])
def test_gpt_forward_train(kw, msg):
    args = dict(cond=torch.tensor([1]), tokens=TOK) | kw
    with pytest.raises(SJDInputError, match=f"^{msg}"):
        tiny_gpt().forward_train(args.pop("cond"), args.pop("tokens"), **args)


def test_check_model_refuses_bool_geometry():
    from types import SimpleNamespace
    m = SimpleNamespace(vocab_size=16, num_layers=True, num_kv_heads=1, head_dim=2, prefix=None, embed_tokens=None,
                        forward=None)
    with pytest.raises(TypeError, match=r"\.num_layers must be a positive int, got True"):
        check_model(m)


# ------------------------------------------------------------------------------ Hugging Face adapters
@pytest.fixture(scope="module")
def hf_llama():
    pytest.importorskip("transformers")
    from test_hf_adapters import llama
    return llama()


IMAGE_IDS = list(range(8, 24))


@pytest.mark.parametrize("kw,name", [
    (dict(image_token_ids=[8.5, 9.7]), "image_token_ids"),                 # used to be truncated to 8, 9
    (dict(uncond_prompt=[99]), "uncond_prompt"), (dict(uncond_prompt=[]), "uncond_prompt"),
    (dict(uncond_prompt=[1.7]), "uncond_prompt"), (dict(max_image_tokens=-1), "max_image_tokens"),
    (dict(extra_token_ids=[30.5]), "extra_token_ids")],
    ids=["image_ids_float", "uncond_oov", "uncond_empty", "uncond_float", "max_tokens", "extra_float"])
def test_hf_adapter_constructor(hf_llama, kw, name):
    from sjd_kernels.models.hf import HFImageLM
    args = dict(image_token_ids=IMAGE_IDS) | kw
    with pytest.raises(SJDInputError, match=f"^{name} "):
        HFImageLM(hf_llama, args.pop("image_token_ids"), **args)


@pytest.mark.parametrize("call,msg", [
    (lambda a: a.embed_tokens(torch.tensor([[-1, 3]])), r"ids must be codes in \[0, 18\)"),   # clamped to code 0
    (lambda a: a.embed_tokens(torch.tensor([[18]])), r"ids must be codes in \[0, 18\)"),      # clamped to V+1
    (lambda a: a.prefix([1, 5, 9], False), r"cond\[0\] must"),            # used to be 3 prompts of one token
    (lambda a: a.prefix([[1.5, 2]], False), r"cond\[0\] must"),
    (lambda a: a.prefix(torch.tensor([[True, False]]), False), "cond must"),
    (lambda a: a.prefix(None, False), "cond must"),
    (lambda a: a.prefix([], False), "cond must"),
], ids=["id_neg", "id_past_extra", "flat_list", "float_ids", "bool_ids", "none", "empty"])
def test_hf_adapter_ids_and_prompts(hf_llama, call, msg):
    from sjd_kernels.models.hf import HFImageLM
    with pytest.raises(SJDInputError, match=f"^{msg}"):
        call(HFImageLM(hf_llama, IMAGE_IDS, extra_token_ids=[30, 31], uncond_prompt=[1]))


@pytest.mark.parametrize("fn,kw,name", [("grid_forced", dict(batch=-1), "batch"), ("grid_forced", dict(width=0), "width"),
                                        ("grid_forced", dict(tail=(-5,)), "tail"),
                                        ("emu3_forced", dict(vocab_size="16"), "vocab_size")])
def test_forced_layouts(fn, kw, name):
    from sjd_kernels.models import hf
    with pytest.raises(SJDInputError, match=f"^{name} must"):
        getattr(hf, fn)(**(dict(batch=1, height=2, width=2, vocab_size=16) | kw))


@pytest.mark.parametrize("layers,S,slots,mask,name", [
    (2, 8, POS, None, "write_slots and mask"),                          # AttributeError deep inside transformers
    (2, 8, POS, FULL.double(), "mask must"),                            # a float mask is added, not a selection
    (1, 8, POS, FULL, "cache has shape"),                               # wrote layer 0, then IndexError
    (2, 4, POS + 2, FULL[..., :4], "write_slots must")],
    ids=["no_mask", "float_mask", "layers", "slot_past_S"])
def test_hf_forward_with_cache_refused_before_writing(hf_llama, layers, S, slots, mask, name):
    from sjd_kernels.models.hf import HFImageLM
    a = HFImageLM(hf_llama, IMAGE_IDS)
    c = StaticKVCache(layers, 1, 2, S, 8, dtype=torch.float64)
    snap = snapshot(c)
    with pytest.raises(SJDInputError, match=f"^{name}"):
        a(torch.randn(1, 3, 32, dtype=torch.float64), slots, cache=c, mask=mask, write_slots=slots)
    assert unchanged(c, snap)


@pytest.fixture(scope="module")
def janus_adapter():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "JanusForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Janus")
    from sjd_kernels.models.hf import from_janus
    from test_hf_emu3_janus import janus
    return from_janus, janus()


def test_janus_embed_tokens_out_of_vocab(janus_adapter):
    from_janus, hf = janus_adapter
    with pytest.raises(SJDInputError, match=r"^ids must be codes in \[0, 24\)"):
        from_janus(hf).embed_tokens(torch.tensor([[24]]))               # used to embed code 23


def test_janus_max_image_tokens(janus_adapter):
    from_janus, hf = janus_adapter
    with pytest.raises(SJDInputError, match="^max_image_tokens must"):
        from_janus(hf, max_image_tokens=0)


# ------------------------------------------------------------------------------ tokenizer, quality, data
CODEBOOK = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call,msg", [
    (lambda: PatchVQ(CODEBOOK, 0, 4), "patch must"),
    (lambda: PatchVQ(CODEBOOK, 2, -4), "image_size must"),
    (lambda: PatchVQ(CODEBOOK[:0], 2, 4), "codebook must"),
    (lambda: PatchVQ(CODEBOOK, 2, 4).encode(torch.rand(2, 4, 4), chunk=-1), "chunk must"),   # uninitialised ids
    (lambda: PatchVQ(CODEBOOK, 2, 4).encode(torch.full((1, 4, 4), float("nan"))), "images must hold finite"),
    (lambda: PatchVQ(CODEBOOK, 2, 4).decode(torch.tensor([[0.7, 1.2, 2.9, 3.5]])), "tokens must be integer"),
    (lambda: PatchVQ(CODEBOOK, 2, 4).decode(torch.tensor([[True, False, True, False]])), "tokens must be integer"),
    (lambda: PatchVQ(CODEBOOK, 2, 4).decode(torch.tensor([[0, 1, 2, 8]])), r"tokens: token ids must lie in \[0, 8\)"),
    (lambda: PatchVQ(CODEBOOK, 2, 4).encode(np.full((1, 4, 4), 200, np.uint8)), r"images must hold values in \[0, 1\]"),
], ids=["patch_0", "image_size_neg", "no_codes", "chunk_neg", "images_nan", "tokens_float", "tokens_bool", "tokens_K",
        "images_uint8"])
def test_tokenizer(call, msg):
    with pytest.raises(SJDInputError, match=f"^{msg}"):
        call()


IMGS = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(0))
FEATS = np.random.default_rng(0).random((5, 3))


def quality_model():
    torch.manual_seed(0)
    return QualityModel(TinyCNN(3))


@pytest.mark.parametrize("call,msg", [
    (lambda: quality_model().accuracy(IMGS, np.zeros((5, 1), np.int64)), r"labels must be class ids \[B=5\]"),  # 5x5
    (lambda: quality_model().accuracy(IMGS, [1]), r"labels must be class ids \[B=5\]"),    # broadcast
    (lambda: quality_model().accuracy(IMGS, ["a"] * 5), r"labels must be class ids \[B=5\]"),
    (lambda: quality_model().predict(torch.full((2, 8, 8), float("nan"))), "images must hold finite"),  # class 0
    (lambda: quality_model().predict(torch.rand(8, 8)), "images must be gray images"),
    (lambda: quality_model().predict(torch.rand(0, 8, 8)), "images must be gray images"),
    (lambda: frechet_distance(FEATS[:, 0], FEATS[:, 0]), "fa must"),
    (lambda: frechet_distance(FEATS, FEATS[:, :2]), "fb must"),
    (lambda: frechet_distance(FEATS * np.nan, FEATS), "fa holds NaN"),
    (lambda: TinyCNN(0), "num_classes must"),
], ids=["labels_5x1", "labels_1", "labels_str", "images_nan", "images_2d", "images_empty", "fa_1d", "fb_D",
        "fa_nan", "classes_0"])
def test_quality(call, msg):
    with pytest.raises(SJDInputError, match=f"^{msg}"):
        call()


@pytest.fixture
def small_mnist(monkeypatch):
    X = np.zeros((20, 28, 28), np.float32)
    monkeypatch.setattr(data, "_mnist_all", lambda: (X, np.repeat(np.arange(10), 2)))


@pytest.mark.parametrize("n,msg", [(-1, "n must be an int >= 1"), (0, "n must be an int >= 1"),
                                   (2.5, "n must be an int >= 1"), (True, "n must be an int >= 1"),
                                   (25, "n must be at most 20")])
def test_real_images_n(small_mnist, n, msg):
    with pytest.raises(SJDInputError, match=f"^{msg}"):                # -1 used to drop the last image,
        data.real_images("mnist", "all", n=n)                           # 25 to return the 20 there are


def test_mnist_split_checked_before_loading(monkeypatch):
    monkeypatch.setattr(data, "_mnist_all", lambda: pytest.fail("loaded MNIST before checking split"))
    with pytest.raises(SJDInputError, match="^split must be 'train', 'test' or 'all'"):
        data.mnist("val")


def test_photo_crops_n_checked_before_loading(monkeypatch):
    monkeypatch.setattr(data, "photos", lambda: pytest.fail("loaded the photographs before checking n"))
    with pytest.raises(SJDInputError, match="^n must be an int >= 10"):
        data.photo_crops(25.5)


# ------------------------------------------------------------------------------ SJD2 pieces, model names
def sjd2_emb():
    return SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm(4))


E = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call,msg", [
    (lambda: sjd2_emb().level_embed(torch.tensor([-1])), r"level must lie in \[0, K=3\]"),   # row of level 3
    (lambda: sjd2_emb().noise(E, torch.tensor([[0, -1]]), torch.randn(1, 2, 4)), r"level must lie in \[0, K=3\]"),
    (lambda: noisy_image_inputs(sjd2_emb(), E, torch.tensor([[1]])), "level must have shape"),  # broadcast
    (lambda: NoiseSchedule(rho=float("inf")), "rho must"),
    (lambda: NoiseSchedule(levels=True), "levels must"),
    (lambda: NoiseSchedule(s_min="a"), "s_min must"),
    (lambda: LevelEmbedding(-1, 4), "levels must"),
    (lambda: EmbedNorm.from_embedding(torch.zeros(5, 3), min_std=0.0), "min_std must"),
    (lambda: sample_segment_levels(2, 4, 2, p_rising=float("nan")), "p_rising must"),      # never rising
    (lambda: sample_segment_levels(2, 4, True), "levels must"),
    (lambda: sample_segment_levels(2.5, 4, 2), "batch must"),
    (lambda: position_noise(torch.tensor([1.5]), torch.tensor([2]), 4), "seed must be integers"),  # seed 1
    (lambda: position_noise(torch.tensor([1]), torch.tensor([2]), 0), "dim must"),
    (lambda: position_noise(2 ** 64, torch.tensor([2]), 4), "seed must be integers in int64"),   # was a bare ValueError
    (lambda: position_noise(True, torch.tensor([2]), 4), "seed must be integers"),              # was seed 1
    (lambda: position_noise(torch.tensor([1, 2]), torch.arange(3), 4), r"seed \[2\] and position \[3\] must broadcast"),
    (lambda: position_noise(1, [0, 2.5], 4), "position must be integers"),
    (lambda: next_clean_token_loss(torch.randn(2, 3, 5), torch.tensor([[0, 1, 5], [3, 4, 0]])), "targets must be token"),
    (lambda: next_clean_token_loss(torch.randn(2, 3, 5), torch.tensor([[0, 1], [3, 4]])), "targets must have shape"),
    (lambda: checkpoint.noisy_logits(tiny_gpt(), SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm(16)), torch.tensor([1]),
                                     TOK, torch.zeros(1, 2, dtype=torch.int64)), "levels must have shape"),  # broadcast
    (lambda: checkpoint.gpt_forward_parts(tiny_gpt(), torch.tensor([7]), False), "cond: class ids must be in"),
], ids=["level_embed_neg", "noise_level_neg", "level_shape", "rho_inf", "levels_bool", "s_min_str", "level_table_neg",
        "min_std_0", "p_rising_nan", "seg_levels_bool", "seg_batch_float", "seed_float", "dim_0", "seed_2_64", "seed_bool",
        "seed_position_broadcast", "position_float_list", "targets_V",
        "targets_shape", "noisy_logits_levels", "forward_parts_cond"])
def test_sjd2_pieces(call, msg):
    with pytest.raises(SJDInputError, match=f"^{msg}"):
        call()


def test_position_noise_takes_numpy_and_nested_integers():
    """NumPy integers and arrays and nested lists of ints are integers (the check refused them); NumPy
    floats and bools, uint64 past int64 and ragged lists are named errors."""
    import numpy as np
    want = position_noise(torch.tensor([[5], [6]]), torch.tensor([[7, 3], [7, 3]]), 8)
    for seed, pos in ((np.array([[5], [6]]), [[7, 3], [7, 3]]), ([[5], [np.int64(6)]], np.array([[7, 3], [7, 3]],
                                                                                                 dtype=np.uint16))):
        assert torch.equal(position_noise(seed, pos, 8), want)
    assert torch.equal(position_noise(np.int64(5), 7, 8), want[0, 0])
    assert position_noise(5, [], 8).shape == (0, 8)
    for bad, what in ((np.float32(5), "NumPy float32 scalar"), (np.array([True]), "NumPy bool array"),
                      (np.array([2 ** 63], dtype=np.uint64), "NumPy uint64 array"), ([[1], [2, 3]], "of a regular shape"),
                      ([np.bool_(True)], "got")):
        with pytest.raises(SJDInputError, match="^seed must be integers in int64.*" + what):
            position_noise(bad, 7, 8)


@pytest.mark.parametrize("call,msg", [
    (lambda: bundled.load("cifar"), "name: unknown bundled model 'cifar'"),
    (lambda: checkpoint.manifest("../x"), "model: unknown bundled model '../x'"),   # looked for weights/../x_sjd2.json
    (lambda: checkpoint.load_finetuned("../x"), "model: unknown bundled model '../x'"),
], ids=["bundled", "sjd2_manifest", "sjd2_load"])
def test_unknown_model_names(call, msg):
    with pytest.raises(bundled.BundledModelError, match=f"^{msg}"):
        call()


def _damaged_copies(tmp_path, text):
    """The bundled mnist manifests and a tiny GPT checkpoint copied to ``tmp_path``, every JSON file
    replaced by ``text``."""
    import shutil

    from sjd_kernels.models import save_gpt
    for f in ("mnist.json", "mnist_sjd2.json"):
        shutil.copy(bundled.WEIGHTS_DIR / f, tmp_path / f)
    save_gpt(tiny_gpt(), tmp_path / "tiny.safetensors")
    for f in tmp_path.glob("*.json"):
        f.write_text(text)


@pytest.mark.parametrize("text,msg", [("{\"files\": ", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
                                      ("{}", "lacks the entries")], ids=["truncated", "list", "empty"])
def test_damaged_metadata_names_the_file(tmp_path, text, msg):
    """A damaged manifest or checkpoint JSON is the loader's own error naming the file, not a
    JSONDecodeError or a KeyError."""
    from sjd_kernels.models import GPTCheckpointError, load_gpt
    _damaged_copies(tmp_path, text)
    for call, err, f in ((lambda: bundled.manifest("mnist", tmp_path), bundled.BundledModelError, "mnist.json"),
                         (lambda: checkpoint.manifest("mnist", tmp_path), bundled.BundledModelError,
                          "mnist_sjd2.json"),
                         (lambda: load_gpt(tmp_path / "tiny.safetensors"), GPTCheckpointError, "tiny.json")):
        with pytest.raises(err, match=f"{f} .*{msg}"):
            call()


def test_checkpoint_config_that_makes_no_gpt(tmp_path):
    import json

    from sjd_kernels.models import GPTCheckpointError, load_gpt, save_gpt
    save_gpt(tiny_gpt(), tmp_path / "tiny.safetensors")
    meta = json.loads((tmp_path / "tiny.json").read_text())
    meta["config"]["n_layers"] = meta["config"].pop("n_layer")           # a renamed field
    (tmp_path / "tiny.json").write_text(json.dumps(meta))
    with pytest.raises(GPTCheckpointError, match="its config does not make a GPTConfig"):
        load_gpt(tmp_path / "tiny.safetensors")
