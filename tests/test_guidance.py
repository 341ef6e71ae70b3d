"""Guidance: encoding, image-token mapping, tweening, concepts, delta spaces, build/distance."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embedpin.api import run_config
from embedpin.errors import ConfigError, InputError, ModelError
from embedpin.guidance import (
    GuidanceOptions,
    build,
    candidate_vectors,
    distance,
    encode_image,
    encode_prompt,
    encode_text_from_embeds,
    make_context,
    map_image_tokens,
)
from embedpin.guidance.deltas import emphasis
from embedpin.guidance.tween import cluster_profile, threshold_gate, tween_weights
from embedpin.models.micro.arch import random_components
from embedpin.models.micro.dataset import batch

PROMPT = "a small blue circle at the top right"
ALL = {"guidance", "cfg", "strength", "token_weights", "delta", "token_vectors"}


@pytest.fixture(scope="module")
def comps():
    return random_components(scale=0.25)


@pytest.fixture(scope="module")
def images():
    imgs, _, _ = batch(np.random.default_rng(1), 3)
    return torch.from_numpy(np.ascontiguousarray(imgs))


@pytest.fixture(scope="module")
def ctx(comps, images):
    """Everything on: guide image, concept, img2img, 2 token vectors."""
    opts = GuidanceOptions(n_vectors=2, vector_k=4, delta_k=4, init_word="picture")
    return make_context(comps, PROMPT, guide=images[:1], concepts="blue circle", init_image=images[1:2], options=opts)


def _neutral(ctx, lam):
    """Every block at its no-effect value: FlexDiffuse scalars and deltas 0, token weights 1."""
    out = {}
    for b in ctx.blocks(ALL):
        value = 1.0 if b.name == "token_weights" else b.default if b.name in ("cfg", "strength") else 0.0
        out[b.name] = torch.full((lam, b.size), value)
    return out


# --- encoding -------------------------------------------------------------------------------


def test_encode_prompt_matches_the_text_encoder(comps):
    enc = encode_prompt(comps, "a red circle")
    ref = comps.text_encoder(enc.ids).last_hidden_state
    assert enc.hidden.shape == (1, 77, 64) and enc.ids.shape == (1, 77)
    assert enc.n_tokens == 3
    assert enc.token_strings[:5] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert torch.equal(enc.hidden, ref)


def test_clip_skip_uses_an_earlier_layer_then_the_final_norm(comps):
    enc = encode_prompt(comps, "a red circle", clip_skip=1)
    te = comps.text_encoder
    states = te(enc.ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(enc.hidden, te.final_layer_norm(states[-2]))
    with pytest.raises(ConfigError):
        encode_prompt(comps, "a red circle", clip_skip=5)


def test_encode_from_embeds_batches_candidates(comps):
    enc = encode_prompt(comps, "a red circle")
    out = encode_text_from_embeds(comps, enc.input_embeds.expand(3, -1, -1), enc.ids)
    assert out.shape == (3, 77, 64)
    torch.testing.assert_close(out, enc.hidden.expand(3, -1, -1))


def test_image_tokens_cls_is_clips_image_embedding(comps, images):
    tokens = encode_image(comps, images[:2])
    assert tokens.shape == (2, 65, 64)  # CLS + 8x8 patches, projected to the text dim
    pixels = (images[:2] - 0.5) / 0.5  # micro CLIP: 64 px, mean = std = 0.5
    ref = comps.clip.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(tokens[:, 0], ref, atol=1e-5, rtol=1e-5)


# --- mapping --------------------------------------------------------------------------------


def _unit2(*degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], -1)[None]


TEXT = 2 * _unit2(45, 0, 12, 90)  # header, t1, t2, t3 (norm 2)
IMAGE = _unit2(180, 5, 60)  # CLS, i1, i2


@pytest.mark.parametrize("mode,reuse,expected", [
    ("alignment-first", True, [0, 1, 1, 2]),
    ("text-order-first", True, [0, 1, 1, 2]),
    ("alignment-first", False, [0, 1, 0, 2]),  # t1-i1 (5 deg), t3-i2 (30 deg), t2 gets the CLS left over
    ("text-order-first", False, [0, 1, 2, 0]),  # t1-i1, t2 best of the rest = i2, t3 = CLS
    ("direct", True, [0, 1, 2, 0]),
    ("direct", False, [0, 1, 2, -1]),
])
def test_mapping_modes_on_hand_made_tokens(mode, reuse, expected):
    m = map_image_tokens(TEXT, IMAGE, mode, reuse)
    assert m.index[0].tolist() == expected
    text_deg, image_deg = (45, 0, 12, 90), (180, 5, 60)
    cosines = [math.cos(math.radians(t - image_deg[j])) if j >= 0 else 0.0 for t, j in zip(text_deg, expected)]
    torch.testing.assert_close(m.alignment[0], torch.tensor(cosines, dtype=torch.float64))
    mapped = m.tokens(TEXT)  # rescaled to the text's norm (2); unmapped positions keep the text
    torch.testing.assert_close(mapped.norm(dim=-1), torch.full((1, 4), 2.0, dtype=torch.float64))
    for i, j in enumerate(expected):
        want = TEXT[0, i] if j < 0 else 2 * IMAGE[0, j]
        torch.testing.assert_close(mapped[0, i], want)


def test_mapping_without_reuse_leaves_extra_positions_unmapped():
    text = _unit2(0, 10, 20, 30, 40)
    m = map_image_tokens(text, _unit2(0, 27), "alignment-first", reuse=False)
    assert m.index[0].tolist() == [0, 0, -1, 1, -1]  # 30 deg <- 27 deg first, then 10 deg <- CLS; the rest run out
    assert m.valid[0].tolist() == [True, True, False, True, False]


# --- tweening -------------------------------------------------------------------------------


def _flex(**kw):
    base = dict(linear_start=0.0, linear_end=0.0, clustered=0.0, threshold=0.0, threshold_floor=0.5,
                max_image=1.0, header_cap=0.15)
    base.update(kw)
    return {k: torch.tensor([v]) for k, v in base.items()}


def test_linear_ramp_capped_by_max_image_and_header_cap():
    a = torch.zeros(1, 5)
    valid = torch.ones(1, 5, dtype=torch.bool)
    w = tween_weights(a, torch.zeros(1, 5), valid, _flex(linear_start=1.0, linear_end=0.0, max_image=0.6))
    torch.testing.assert_close(w, torch.tensor([[0.15, 0.6, 0.5, 0.25, 0.0]]))
    w = tween_weights(a, torch.zeros(1, 5), valid, _flex(linear_start=-1.0, linear_end=-1.0))
    torch.testing.assert_close(w, torch.tensor([[-0.15, -1.0, -1.0, -1.0, -1.0]]))


def test_cluster_profile_peaks_and_slopes():
    a = torch.tensor([[0.9, 0.0, 1.0, 0.0, 0.0, 0.0]])  # header's own alignment is ignored
    torch.testing.assert_close(cluster_profile(a, radius=2.0), torch.tensor([[0.0, 0.5, 1.0, 0.5, 0.0, 0.0]]))


def test_threshold_gate_is_a_soft_step_at_the_floor():
    g = threshold_gate(torch.tensor([[0.9, 0.5, 0.1]]), torch.tensor([0.5]), softness=0.02)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.5, 0.0]]), atol=1e-6, rtol=0)


def test_emphasis_scales_deviation_from_the_mean():
    h = torch.tensor([[[0.0], [3.0], [6.0]]])
    out = emphasis(h, torch.tensor([[0.0, 2.0]]), torch.tensor([1, 2]))
    assert out[0, :, 0].tolist() == [0.0, 3.0, 9.0]


# --- build: plain at defaults, header cap, finiteness -----------------------------------------


def test_defaults_and_zero_params_give_the_plain_conditioning_bitwise(ctx):
    for params in ({}, _neutral(ctx, 3), {b.name: torch.full((3, b.size), b.default) for b in ctx.blocks(ALL)}):
        cond = build(ctx, params)
        for row in cond.prompt_embeds:
            assert torch.equal(row, ctx.plain.hidden[0])
        assert torch.equal(distance(ctx, cond), torch.zeros(cond.prompt_embeds.shape[0]))
    assert torch.equal(cond.negative_embeds, ctx.negative.hidden)


def test_plain_without_token_vectors_is_the_prompt_encoding(comps, images):
    ctx = make_context(comps, PROMPT, guide=images[:1])
    assert torch.equal(ctx.plain.hidden, encode_prompt(comps, PROMPT).hidden)
    zero = {n: torch.zeros(2, 1) for n in ("linear_start", "linear_end", "clustered", "threshold", "max_image")}
    assert torch.equal(build(ctx, zero).prompt_embeds, ctx.plain.hidden.expand(2, -1, -1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(u=arrays(np.float64, (2, 64), elements=st.floats(0, 1)))
def test_header_never_moves_more_than_its_cap_and_outputs_are_finite(ctx, u):
    blocks = ctx.blocks(ALL)
    params, col = {}, 0
    for b in blocks:
        x = torch.from_numpy(u[:, col:col + b.size].copy())
        params[b.name] = (b.lower + x * (b.upper - b.lower)).float()
        col += b.size
    assert col <= 64
    cond = build(ctx, params)
    assert torch.isfinite(cond.prompt_embeds).all() and torch.isfinite(cond.token_vectors).all()
    plain = ctx.plain.hidden[0, 0]
    span = (ctx.guided[0].mapping.tokens(ctx.plain.hidden)[0, 0] - plain).norm()
    moved = (cond.prompt_embeds[:, 0] - plain).norm(dim=-1)
    assert (moved <= params["header_cap"][:, 0] * span + 1e-5).all()
    assert torch.isfinite(distance(ctx, cond)).all()


# --- build: what each block does -------------------------------------------------------------


def test_full_image_guidance_replaces_tokens_with_mapped_image_tokens(ctx):
    cond = build(ctx, {"linear_start": torch.ones(1, 1), "linear_end": torch.ones(1, 1)})
    mapped = ctx.guided[0].mapping.tokens(ctx.plain.hidden)
    torch.testing.assert_close(cond.prompt_embeds[:, 1:], mapped[:, 1:])
    header = ctx.plain.hidden[:, 0] + 0.15 * (mapped[:, 0] - ctx.plain.hidden[:, 0])
    torch.testing.assert_close(cond.prompt_embeds[:, 0], header)


def test_negative_guidance_pushes_away_from_the_image(ctx):
    lin = torch.tensor([[0.5], [-0.5]])
    cond = build(ctx, {"linear_start": lin, "linear_end": lin})
    mapped = ctx.guided[0].mapping.tokens(ctx.plain.hidden)[0, 1:]
    cos = torch.nn.functional.cosine_similarity(cond.prompt_embeds[:, 1:], mapped, dim=-1).mean(-1)
    cos0 = torch.nn.functional.cosine_similarity(ctx.plain.hidden[0, 1:], mapped, dim=-1).mean()
    assert cos[0] > cos0 > cos[1]


def test_raising_max_image_moves_monotonically_further(ctx):
    cap = torch.tensor([[0.0], [0.3], [0.6], [1.0]])
    one = torch.ones(4, 1)
    d = distance(ctx, build(ctx, {"linear_start": one, "linear_end": one, "max_image": cap}))
    assert d[0] == 0 and (d[1:] > d[:-1]).all()


def test_concept_moves_each_position_by_its_gate(ctx):
    plain = ctx.plain.hidden[0]
    target = ctx.guided[0].concepts.direction[0] * plain.norm(dim=-1, keepdim=True)
    gate = ctx.guided[0].concepts.gate[0]
    assert gate[0] == 0 and gate.max() > 0.5 and gate.min() < 1e-3  # some positions pass, some do not
    cond = build(ctx, {"concept": torch.tensor([[1.0], [-0.5]])})
    for row, strength in zip(cond.prompt_embeds, (1.0, -0.5)):
        fraction = (row - plain).norm(dim=-1) / (target - plain).norm(dim=-1)
        torch.testing.assert_close(fraction, abs(strength) * gate, atol=1e-5, rtol=1e-4)


def test_delta_distance_is_the_coefficient_norm_for_every_basis(comps, images):
    c = torch.tensor([[0.1, 0.0, -0.2, 0.0], [0.0, 0.3, 0.0, 0.4]])
    for kind in ("image", "pca", "random"):
        ctx = make_context(comps, PROMPT, guide=images[:1], options=GuidanceOptions(delta_basis=kind, delta_k=4))
        d = distance(ctx, build(ctx, {"delta": c}))
        torch.testing.assert_close(d, c.norm(dim=1), atol=1e-5, rtol=1e-4)


def test_random_basis_is_reproducible_from_the_seed(comps):
    bases = [make_context(comps, PROMPT, options=GuidanceOptions(delta_basis="random", delta_k=3, seed=s)).delta_basis.sequence
             for s in (7, 7, 8)]
    assert torch.equal(bases[0], bases[1]) and not torch.allclose(bases[0], bases[2])


def test_token_vectors_start_at_the_init_word(comps, ctx):
    word = comps.tokenizer("picture", add_special_tokens=False).input_ids
    init = comps.text_encoder.embeddings.token_embedding.weight[word[0]]
    vecs = candidate_vectors(ctx, torch.zeros(2 * 4))
    assert vecs.shape == (2, 64) and torch.equal(vecs, init.expand(2, -1))
    assert torch.equal(build(ctx, {}).token_vectors[0], vecs)
    written = encode_prompt(comps, PROMPT + " picture picture").hidden
    torch.testing.assert_close(ctx.plain.hidden, written)


def test_token_vectors_change_only_positions_after_the_placeholders_start(ctx):
    coeffs = torch.zeros(2, 8)
    coeffs[1, 0] = 0.5
    cond = build(ctx, {"token_vectors": coeffs})
    start = int(ctx.plain.placeholders[0])
    assert torch.equal(cond.prompt_embeds[0], ctx.plain.hidden[0])
    torch.testing.assert_close(cond.prompt_embeds[1, :start], ctx.plain.hidden[0, :start])
    assert (cond.prompt_embeds[1, start:] - ctx.plain.hidden[0, start:]).norm() > 1e-3
    torch.testing.assert_close(cond.token_vectors[1], candidate_vectors(ctx, coeffs[1]))


def test_cfg_and_strength_pass_through(ctx, comps, images):
    cond = build(ctx, {"cfg": torch.tensor([[3.0], [9.0]]), "strength": torch.tensor([[0.3], [0.9]])})
    assert cond.cfg.tolist() == [3.0, 9.0] and cond.strength.tolist() == pytest.approx([0.3, 0.9])
    assert build(make_context(comps, PROMPT), {}).strength is None


def test_image_only_guidance(comps, images):
    ctx = make_context(comps, "", guide=images[:1])
    assert ctx.plain.n_tokens == 0
    names = [b.name for b in ctx.blocks({"guidance"})]
    assert names == ["linear_start", "linear_end", "clustered", "threshold", "threshold_floor", "max_image",
                     "header_cap"]
    assert distance(ctx, build(ctx, {"linear_end": torch.ones(1, 1)}))[0] > 0.1
    with pytest.raises(ConfigError):
        ctx.blocks({"token_weights"})


def test_multiple_guide_images_pool_their_tokens(comps, images):
    ctx = make_context(comps, PROMPT, guide=[images[:1], images[1:3]])
    assert ctx.guided[0].image_tokens.shape == (1, 3 * 65, 64)


# --- bad input ------------------------------------------------------------------------------


def test_bad_inputs_raise_user_errors(comps, images, tmp_path):
    garbage = tmp_path / "guide.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InputError):
        make_context(comps, PROMPT, guide=garbage)
    with pytest.raises(InputError):
        make_context(comps, PROMPT, guide=tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="give a --prompt, a --guide image, or both"):  # (the run's config)
        run_config(prompt="   ")
    with pytest.raises(ConfigError, match="--concepts needs a --guide image"):
        run_config(prompt=PROMPT, concepts="creepy tree")
    with pytest.raises(ConfigError):
        make_context(comps, PROMPT, options=GuidanceOptions(mapping="best"))
    plain = make_context(comps, PROMPT)
    for names in ({"linear_end"}, {"token_vectors"}, {"strength"}, {"bogus"}):
        with pytest.raises(ConfigError):
            plain.blocks(names)
    with pytest.raises(ConfigError):
        build(plain, {"delta": torch.zeros(2, 3)})
    with pytest.raises(ModelError):
        encode_image(type(comps)(**{**comps.__dict__, "towers": ()}), images[:1])


def test_guide_image_from_a_file(comps, images, tmp_path):
    from PIL import Image

    arr = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path / "guide.png"
    Image.fromarray(arr).save(path)
    ctx = make_context(comps, PROMPT, guide=path)
    pixels = torch.from_numpy(arr).permute(2, 0, 1)[None] / 255.0
    torch.testing.assert_close(ctx.guided[0].image_tokens, encode_image(comps, pixels))
