"""Scoring: batched ꟻLIP against NVIDIA's flip-evaluator, aggregation, CLIP, the Scorer."""

from __future__ import annotations

import io
import math

import flip_evaluator
import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.transform import resize

from embedpin.api import run_config
from embedpin.errors import ConfigError
from embedpin.models.clip import clip_image_embeds, clip_text_embeds
from embedpin.scoring.aggregate import WORST_LOSS, aggregate, lineage_levels
from embedpin.scoring.clip_loss import clip_image_loss, cosine_distance
from embedpin.scoring.flip import (
    DEFAULT_PPD,
    flip_cross,
    flip_features,
    flip_loss,
    pairwise_flip,
    prepare_reference,
)
from embedpin.scoring.scorer import Scorer

SIZE = (24, 32)


def _photo(name: str) -> np.ndarray:
    im = getattr(skimage.data, name)()
    im = np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im
    return resize(im, SIZE, anti_aliasing=True).astype(np.float32)


def _distort(x: np.ndarray, kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "noise":
        y = x + rng.normal(0, 0.08, x.shape)
    elif kind == "blur":
        y = resize(resize(x, (8, 11), anti_aliasing=True), SIZE)
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray((x * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=10)
        y = np.asarray(Image.open(buf), dtype=np.float32) / 255
    elif kind == "shift":
        y = np.roll(x, 2, axis=1)
    else:  # colour
        y = x * np.array([1.2, 0.9, 0.75]) + 0.02
    return np.clip(y, 0, 1).astype(np.float32)


def _t(x: np.ndarray) -> torch.Tensor:
    """[.., H, W, 3] numpy -> [.., 3, H, W] torch."""
    return torch.from_numpy(np.ascontiguousarray(x)).movedim(-1, -3)


def _uniform(rgb, n=1, size=(8, 8)) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, *size).contiguous()


@pytest.fixture(scope="module")
def natural_pairs():
    """(references, tests) [6, H, W, 3]: one photo x 5 distortions, and another with noise."""
    kinds = [("astronaut", k) for k in ("noise", "blur", "jpeg", "shift", "colour")] + [("coffee", "noise")]
    refs = [_photo(name) for name, _ in kinds]
    tests = [_distort(x, k) for x, (_, k) in zip(refs, kinds)]
    return np.stack(refs), np.stack(tests)


@pytest.fixture(scope="module")
def components():
    from embedpin.models.micro.arch import random_components

    return random_components(seed=0, scale=0.25)


# --- ꟻLIP vs the reference -------------------------------------------------------------


def test_flip_matches_flip_evaluator_on_natural_pairs(natural_pairs):
    refs, tests = natural_pairs
    ours, our_maps = flip_loss(_t(tests), _t(refs), return_maps=True)  # one batched call
    for i, (r, t) in enumerate(zip(refs, tests)):
        ref_map, ref_mean, _ = flip_evaluator.evaluate(r.copy(), t.copy(), "LDR", applyMagma=False)
        assert abs(ours[i].item() - ref_mean) < 1e-3
        assert np.abs(our_maps[i].numpy() - ref_map[..., 0]).mean() < 0.01
    assert ours.min() > 0.02  # every distortion is visible


def test_flip_matches_reference_at_other_ppd_and_odd_sizes():
    x = resize(skimage.data.chelsea(), (5, 13), anti_aliasing=True).astype(np.float32)
    y = np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    for ppd in (20.0, 120.0):
        _, ref_mean, _ = flip_evaluator.evaluate(x.copy(), y.copy(), "LDR", applyMagma=False, parameters={"ppd": ppd})
        assert abs(flip_loss(_t(y[None]), _t(x[None]), ppd=ppd).item() - ref_mean) < 1e-3


@pytest.mark.parametrize("a, b, expected", [
    ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.96739),  # white vs black
    ((0.5, 0.5, 0.5), (1.0, 0.0, 0.0), 0.95039),  # grey vs red
    ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), 1.0),  # green vs blue: FLIP's largest colour error
    ((0.2, 0.4, 0.6), (0.25, 0.4, 0.6), 0.08290),
])
def test_flip_fixed_values_on_uniform_images(a, b, expected):
    assert flip_loss(_uniform(b), _uniform(a)).item() == pytest.approx(expected, abs=2e-5)


def test_flip_fixed_value_on_checkerboard_depends_on_ppd():
    checker = (torch.arange(8)[:, None] + torch.arange(8)).remainder(2).float().expand(1, 3, 8, 8)
    grey = _uniform((0.5, 0.5, 0.5))
    assert flip_loss(checker, grey).item() == pytest.approx(0.65596, abs=2e-5)
    assert flip_loss(checker, grey, ppd=20.0).item() == pytest.approx(0.85288, abs=2e-5)


def test_identical_images_score_zero(natural_pairs):
    x = _t(natural_pairs[1][:4])
    err, maps = flip_loss(x, x, return_maps=True)
    assert torch.equal(err, torch.zeros(4)) and torch.equal(maps, torch.zeros(4, *SIZE))


def test_prepared_reference_broadcast_and_symmetry(natural_pairs):
    refs, tests = _t(natural_pairs[0][:3]), _t(natural_pairs[1][:3])
    direct = flip_loss(tests, refs)
    assert torch.allclose(flip_loss(tests, prepare_reference(refs)), direct)
    assert torch.allclose(flip_loss(refs, tests), direct)  # ꟻLIP is symmetric
    one = flip_loss(tests, refs[:1])
    assert torch.allclose(one, flip_cross(tests, refs)[:, 0])
    assert torch.allclose(flip_cross(tests, refs).diagonal(), direct)
    at_30 = flip_features(refs, ppd=30.0)
    assert torch.allclose(flip_loss(tests, at_30), flip_loss(tests, refs, ppd=30.0))  # the prepared ppd
    with pytest.raises(ValueError, match="ppd"):
        flip_loss(tests, at_30, ppd=DEFAULT_PPD)
    with pytest.raises(ValueError, match="does not match"):
        flip_loss(tests, refs[:2])


def test_pairwise_flip_is_all_pairs_of_each_group(natural_pairs):
    x = _t(natural_pairs[1][:6]).view(2, 3, 3, *SIZE)
    mat = pairwise_flip(x)
    assert mat.shape == (2, 3, 3)
    assert torch.equal(mat, mat.transpose(-1, -2)) and torch.equal(mat.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 3))
    assert mat[1, 0, 2].item() == pytest.approx(flip_loss(x[1, 2:3], x[1, 0:1]).item(), abs=1e-6)


def test_flip_dtype_follows_input(natural_pairs):
    refs, tests = _t(natural_pairs[0][:2]), _t(natural_pairs[1][:2])
    f32 = flip_loss(tests, refs)
    f64 = flip_loss(tests.double(), refs.double())
    assert f64.dtype == torch.float64 and torch.allclose(f64.float(), f32, atol=1e-5)
    half = flip_loss(tests.half(), refs.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), f32, atol=5e-3)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 9))
def test_flip_is_in_unit_interval_and_zero_only_for_equal(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, 3, h, w, generator=g), torch.rand(2, 3, h, w, generator=g)
    err = flip_loss(a, b)
    assert ((err > 0) & (err <= 1)).all()
    assert torch.equal(flip_loss(a, a), torch.zeros(2))


# --- aggregation -----------------------------------------------------------------------

X = torch.tensor([[0.1, 0.3, 0.2, 0.6], [0.2, 0.2, 0.2, 0.2]])
LINEAGE = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])  # two branch points, 4 leaves
# Candidate 0 by hand, std weight 1 (population std):
#   K=1 root {all}: 0.3 + sqrt(0.035) = 0.487083;  K=2 {0,1},{2,3}: mean(0.2+0.1, 0.4+0.2) = 0.45;
#   K=3 leaves: mean 0.3 (no spread).
LEVELS = (0.487083, 0.45, 0.3)


@pytest.mark.parametrize("weighting, expected", [
    ("none", LEVELS[0]),
    ("geometric", (LEVELS[0] + LEVELS[1] ** 0.5 + LEVELS[2] ** (1 / 3)) / 3),  # X^(s/K)
    ("exponential", (LEVELS[0] * 1.5 + LEVELS[1] * 1.5**2 + LEVELS[2] * 1.5**3) / 3),  # X (0.5+s)^K
    ("polynomial", ((1 + LEVELS[0]) + (1 + LEVELS[1]) ** 2 + (1 + LEVELS[2]) ** 3) / 3),  # (1+X)^(sK)
])
def test_aggregate_hyperbatch_weightings_by_hand(weighting, expected):
    loss = aggregate(X, LINEAGE, std_weight=1.0, weighting=weighting, scale=1.0)
    assert loss[0].item() == pytest.approx(expected, abs=1e-5)
    assert loss.shape == (2,)


def test_lineage_levels_ignore_columns_that_split_nothing():
    with_root = torch.cat((torch.zeros(4, 1, dtype=torch.long), LINEAGE * 7 - 3), 1)
    assert torch.equal(lineage_levels(with_root, 4), lineage_levels(LINEAGE, 4))
    assert lineage_levels(LINEAGE, 4).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 2, 3]]
    assert lineage_levels(None, 4).shape == (1, 4)


def test_aggregate_mean_plus_weighted_std():
    assert aggregate(X, std_weight=0.0).tolist() == pytest.approx([0.3, 0.2])
    assert aggregate(X, std_weight=2.0)[0].item() == pytest.approx(0.3 + 2 * 0.035**0.5, abs=1e-6)


def test_aggregate_spread_from_independent_pairs_only():
    # X[0] = [0.1, 0.3, 0.2, 0.6]; roots [0, 1, 0, 1]: pairs (0,1) (0,3) (2,1) (2,3) are independent
    # -> mean |difference| = (0.2 + 0.5 + 0.1 + 0.4) / 4 = 0.3, scaled by sqrt(pi)/2
    roots = torch.tensor([0, 1, 0, 1])
    spread = math.sqrt(math.pi) / 2 * 0.3
    assert aggregate(X, std_weight=1.0, roots=roots)[0].item() == pytest.approx(0.3 + spread, abs=1e-6)
    # every image its own root (a plain batch): all 6 pairs, |diffs| 0.2 0.1 0.5 0.1 0.3 0.4 -> 1.6 / 6
    plain = aggregate(X, std_weight=1.0, roots=torch.arange(4))
    assert plain[0].item() == pytest.approx(0.3 + math.sqrt(math.pi) / 2 * 1.6 / 6, abs=1e-6)
    assert aggregate(X, std_weight=1.0, roots=torch.zeros(4, dtype=torch.long)).tolist() == pytest.approx(
        aggregate(X, std_weight=1.0).tolist())  # one root: no independent pair, the population std


def test_hyperbatch_spread_is_unbiased_against_a_plain_batch():
    """Skewed per-image losses (mostly hits, sometimes a miss): two roots whose 3 siblings
    mostly repeat their root's outcome read the same mean loss as 8 independent images."""
    gen = torch.Generator().manual_seed(0)
    n = 4000

    def draw(*shape):
        miss = torch.rand(*shape, generator=gen) < 0.15
        return torch.where(miss, 0.8, 0.2) + 0.05 * torch.randn(*shape, generator=gen)

    plain = aggregate(draw(n, 8), std_weight=1.0, roots=torch.arange(8))
    root = draw(n, 2).repeat_interleave(4, dim=1)
    same = torch.rand(n, 8, generator=gen) < 0.9
    same[:, ::4] = True
    hyper = aggregate(torch.where(same, root, draw(n, 8)), std_weight=1.0, roots=torch.arange(8) // 4)
    assert hyper.mean().item() / plain.mean().item() == pytest.approx(1.0, abs=0.02)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8), st.floats(0, 3),
       st.sampled_from(["none", "geometric", "exponential", "polynomial"]))
def test_aggregate_is_permutation_invariant_without_lineage(values, w, weighting):
    x = torch.tensor([values], dtype=torch.float64)
    loss = aggregate(x, None, std_weight=w, weighting=weighting)
    assert torch.allclose(loss, aggregate(x.flip(-1), None, std_weight=w, weighting=weighting))
    if weighting == "none":
        assert loss.item() >= x.mean().item() - 1e-12


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_aggregate_non_finite_image_makes_candidate_worst(bad):
    x = X.clone()
    x[1, 2] = bad
    for weighting in ("none", "polynomial"):
        loss = aggregate(x, LINEAGE, weighting=weighting)
        assert loss[1].item() == WORST_LOSS and torch.isfinite(loss).all()
        assert loss[0].item() == pytest.approx(aggregate(X, LINEAGE, weighting=weighting)[0].item())


# --- CLIP ------------------------------------------------------------------------------


def test_clip_loss_lower_for_an_image_than_for_another(components, natural_pairs):
    images = _t(natural_pairs[0][[0, 5]])  # astronaut, coffee
    emb = clip_image_embeds(components, images)
    assert emb.shape == (2, components.clip.config.projection_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    self_loss = clip_image_loss(images, emb[:1], components=components)
    assert self_loss[0].item() == pytest.approx(0.0, abs=1e-5)
    assert self_loss[0] < self_loss[1]
    assert ((self_loss >= 0) & (self_loss <= 2)).all()


def test_clip_text_embeds_and_cosine_distance(components):
    text = clip_text_embeds(components, ["a red circle", "a blue square"])
    assert text.shape == (2, components.clip.config.projection_dim)
    d = cosine_distance(text, text[:1])
    assert d[0].item() == pytest.approx(0.0, abs=1e-5) and d[1] > 0


# --- Scorer ----------------------------------------------------------------------------


def test_scorer_with_targets_matches_flip_and_handles_nan(natural_pairs):
    refs = _t(natural_pairs[0][[0, 5]])
    tests = torch.cat((_t(natural_pairs[1]), refs.flip(0)))  # 8 renders, two equal to a target
    images = tests.view(2, 4, 3, *SIZE)
    scorer = Scorer(None, refs, std_weight=0.5, ppd=DEFAULT_PPD)
    result = scorer(images, LINEAGE)
    expected = flip_cross(tests, refs).mean(-1).view(2, 4)
    assert torch.allclose(result.per_image, expected)
    assert torch.allclose(result.flip, expected.mean(-1)) and result.clip is None
    assert torch.allclose(result.loss, aggregate(expected, std_weight=0.5))
    assert scorer.error_maps(tests[:3]).shape == (3, *SIZE)
    broken = images.clone()
    broken[0, 1] = float("nan")
    again = scorer(broken, LINEAGE)
    assert again.loss[0].item() == WORST_LOSS and again.loss[1] == result.loss[1]
    assert torch.isfinite(again.per_image).all()


def test_scorer_self_mode_compares_each_batch_with_itself(natural_pairs):
    images = _t(natural_pairs[1][:6]).view(2, 3, 3, *SIZE)
    result = Scorer(None, None, ppd=DEFAULT_PPD)(images)
    assert torch.allclose(result.per_image, pairwise_flip(images).sum(-1) / 2)
    same = images[:, :1].expand(2, 3, 3, *SIZE)
    assert torch.equal(Scorer(None, None)(same).loss, torch.zeros(2))
    with pytest.raises(ConfigError, match="at least 2"):
        Scorer(None, None)(images[:, :1])


def test_scorer_combines_flip_and_clip_terms(components, natural_pairs):
    refs, images = _t(natural_pairs[0][:1]), _t(natural_pairs[1][:4]).view(2, 2, 3, *SIZE)
    scorer = Scorer(components, refs, flip_weight=1.0, clip_weight=0.5, text_target="a red circle",
                    std_weight=0.0)
    result = scorer(images)
    assert result.clip.shape == (2,) and (result.clip > 0).all()
    assert torch.allclose(result.loss, result.flip + 0.5 * result.clip, atol=1e-6)


def test_scorer_without_clip_rejects_a_clip_weight():
    with pytest.raises(ConfigError, match="CLIP"):
        Scorer(None, None, clip_weight=1.0)


@pytest.mark.parametrize("settings, match", [
    (dict(flip_weight=0.0, clip_weight=0.0), "at least one of --flip-weight / --clip-weight"),
    (dict(flip_weight=-1.0), "loss weights must be >= 0"),
    (dict(weighting="cubic"), "invalid choice"),
    (dict(ppd=0.0), "--ppd must be > 0"),
    (dict(std_weight=-1.0), "--std-weight must be >= 0"),
])
def test_bad_score_settings_are_config_errors(settings, match):
    """The scorer's settings are checked once, in the run's config (the scorer trusts them)."""
    with pytest.raises(ConfigError, match=match):
        run_config(prompt="x", **settings)


def test_default_ppd_is_flip_evaluators():
    _, _, params = flip_evaluator.evaluate(np.zeros((2, 2, 3), np.float32), np.ones((2, 2, 3), np.float32), "LDR")
    assert DEFAULT_PPD == pytest.approx(params["ppd"], rel=1e-6)


@pytest.mark.parametrize("batch, steps", [(8, 20), (6, 12), (64, 20), (1, 5), (4, 2)])
def test_render_lineage_levels_group_images_by_shared_steps(batch, steps):
    """The renderer's lineage and the scorer's levels agree: at level d (d >= 1), two images
    are in one group iff they share their ancestor after the (d-1)-th branch, i.e. every
    step before the d-th branch; the leaves are the single images."""
    import warnings

    from embedpin.render.schedule import branch_schedule, lineage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = branch_schedule(batch, steps)
    lin = lineage(batch, sched)
    levels = lineage_levels(lin, batch)
    same = lambda ids: ids[:, None] == ids[None, :]  # noqa: E731
    assert len(levels) == (len(sched) + 1 if sched else min(batch, 2))
    for d in range(1, lin.shape[1]):
        assert torch.equal(same(levels[d]), same(lin[:, d]))
    assert torch.equal(same(levels[-1]), torch.eye(batch, dtype=torch.bool))
