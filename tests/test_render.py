"""Hyperbatch rendering: branch schedule and lineage, sampler behaviour, exact replay."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedpin.api import run_config
from embedpin.errors import ConfigError
from embedpin.models.micro.arch import random_components
from embedpin.models.micro.dataset import batch as shapes_batch
from embedpin.render.latents import decode, encode
from embedpin.render.noise import member_seed
from embedpin.render.sampler import RenderPlan, plain, render, render_one
from embedpin.render.schedule import batch_sizes, branch_schedule, doublings, lineage, unet_evaluations

ALL_SAMPLERS = ["euler", "euler-a", "ddim", "ddpm", "dpm++2m", "dpm++2m-karras", "dpm++sde",
                "dpm++sde-karras", "unipc", "heun", "lms", "pndm"]
TOL = 1e-4  # replay / chunking tolerance, fp32 CPU


# ---------------------------------------------------------------- schedule (pure)

def test_schedule_b8_20_steps_branches_first_early_and_last_late():
    assert branch_schedule(8, 20) == [0, 9, 17]
    assert lineage(8, [0, 9, 17]).tolist() == [
        [0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 2, 2], [0, 1, 3, 3],
        [0, 0, 0, 4], [0, 1, 1, 5], [0, 0, 2, 6], [0, 1, 3, 7],
    ]
    assert unet_evaluations(8, 20, [0, 9, 17]) == 1 * 1 + 1 + 2 * 9 + 4 * 8 + 8 * 2  # + the second root's
    assert unet_evaluations(8, 20, []) == 160
    assert unet_evaluations(8, 20, branch_schedule(8, 20)) / unet_evaluations(8, 20, []) <= 0.5


def test_schedule_b64_20_steps_costs_under_30_percent():
    s = branch_schedule(64, 20)
    assert s == [0, 3, 7, 10, 14, 17]
    assert unet_evaluations(64, 20, s) == 336
    assert unet_evaluations(64, 20, s) / unet_evaluations(64, 20, []) <= 0.3


def test_schedule_b6_last_branch_doubles_only_some_members():
    s = branch_schedule(6, 20)
    assert s == [0, 9, 17]
    assert batch_sizes(6, s) == [1, 2, 4, 6]
    assert lineage(6, s).tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 2, 2],
                                      [0, 1, 3, 3], [0, 0, 0, 4], [0, 1, 1, 5]]
    assert unet_evaluations(6, 20, s) == 1 + 1 + 2 * 9 + 4 * 8 + 6 * 2


def test_schedule_b1_has_no_branches():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert branch_schedule(1, 20) == []
    assert lineage(1, []).tolist() == [[0]]
    assert unet_evaluations(1, 20, []) == 20


def test_schedule_too_few_steps_warns_and_falls_back_to_plain():
    with pytest.warns(UserWarning, match="plain batch"):
        assert branch_schedule(8, 3) == []
    assert lineage(8, []).tolist() == [[b] for b in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert branch_schedule(8, 4) == [0, 1, 2]  # one evaluation per batch size


def test_schedule_roots_branch_at_step_0_and_the_rest_late():
    assert branch_schedule(8, 20, roots=4) == [0, 0, 17]
    assert unet_evaluations(8, 20, [0, 0, 17]) == 4 * 18 + 8 * 2  # four roots from step 0
    assert branch_schedule(8, 20, roots=1) == [6, 11, 17]  # one trunk, no second root
    assert branch_schedule(8, 20, roots=8) == [] and branch_schedule(2, 20) == []  # all roots: a plain batch
    with pytest.raises(ConfigError, match="power of two"):  # checked once, in the run's config
        run_config(prompt="x", roots=3)


@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 300), steps=st.integers(1, 60), roots=st.sampled_from([1, 2, 4, 8]))
def test_schedule_and_lineage_properties(batch, steps, roots):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = branch_schedule(batch, steps, roots)
    k, r = doublings(batch), doublings(roots)
    assert 2 ** k >= batch > 2 ** (k - 1) or batch == 1
    later = max(k - r, 0)
    assert len(s) == (k if later and steps - 2 >= later else 0)
    zeros = [v for v in s if v == 0]
    assert len(zeros) == (min(r, k) if s else 0) and s[len(zeros):] == sorted(set(s[len(zeros):]))
    assert all(0 <= v <= steps - 2 for v in s)
    lin = lineage(batch, s)
    sizes = batch_sizes(batch, s)
    assert lin.shape == (batch, len(s) + 1) and sizes[-1] == batch
    assert torch.equal(lin[:, -1], torch.arange(batch))
    assert bool((lin < torch.tensor(sizes)).all())
    for d in range(len(s)):  # each ancestor is its child's parent one depth up
        assert torch.equal(lin[:, d], lin[:, d + 1] % sizes[d])
    plain_cost = unet_evaluations(batch, steps, [])
    assert plain_cost == batch * steps and unet_evaluations(batch, steps, s) <= plain_cost


# ---------------------------------------------------------------- plans

@pytest.mark.parametrize("bad", [
    dict(batch=0), dict(steps=0), dict(batch=2.5), dict(height=30), dict(width=66),
    dict(scheduler="dpm++3m"), dict(seed=-1), dict(eta=-0.1),
])
def test_bad_plans_raise_config_error(bad):
    with pytest.raises(ConfigError):
        RenderPlan(**bad).validate(vae_scale_factor=4)


@pytest.mark.parametrize("bad, message", [
    (dict(max_batch=1), "--max-batch must be >= 2 or auto"), (dict(renoise=-0.5), "--renoise must be >= 0"),
])
def test_run_settings_of_a_plan_are_checked_in_the_config(bad, message):
    with pytest.raises(ConfigError, match=message):
        run_config(prompt="x", **bad)


# ---------------------------------------------------------------- rendering

@pytest.fixture(scope="module")
def comp():
    return random_components(seed=0, scale=0.25)


@pytest.fixture(scope="module")
def conditioning():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 77, 64, generator=g), torch.zeros(1, 77, 64), torch.tensor([3.0, 6.0])


def small_plan(scheduler: str, **kw) -> RenderPlan:
    base = dict(batch=4, steps=4, scheduler=scheduler, height=32, width=32, seed=3, max_batch=64)
    return RenderPlan(**{**base, **kw})


@pytest.fixture(scope="module")
def rendered(comp, conditioning):
    """Hyperbatch render per scheduler, computed once and shared by the tests below."""
    return functools.cache(lambda name: render(comp, *conditioning, small_plan(name)))


def pair_distances(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of every unordered pair of images [B, 3, H, W]: [B (B-1) / 2]."""
    i, j = torch.triu_indices(len(images), len(images), 1)
    return (images[i] - images[j]).abs().mean((1, 2, 3))


def test_render_shapes_lineage_seeds_and_counted_evaluations(rendered):
    r = rendered("euler")
    assert r.images.shape == (2, 4, 3, 32, 32)
    assert r.images.min() >= 0 and r.images.max() <= 1
    assert r.schedule == [0, 2] and r.lineage.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 2], [0, 1, 3]]
    assert r.seeds.shape == (4, 3) and r.seeds.dtype == torch.long
    assert r.seeds[3].tolist() == [member_seed(3, 0), member_seed(3, 1), member_seed(3, 3)]
    # 2 candidates x 2 CFG halves x (1 + 1 second root + 2 + 2 + 4) latent evaluations
    assert r.unet_evals == 2 * 2 * unet_evaluations(4, 4, [0, 2]) == 40


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_siblings_diverge_and_any_image_replays_alone(comp, conditioning, rendered, name):
    r = rendered(name)
    d = pair_distances(r.images[0])  # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert float(d[[0, 2, 3, 5]].min()) > 1e-2  # split at step 0: different images
    assert float(d[[1, 4]].min()) > 1e-4  # split before the last step (rho = 0 gives ~1e-7)
    cond, neg, cfg = conditioning
    one = render_one(comp, cond[1:], neg, cfg[1:], small_plan(name), r.lineage[3])  # a copy at every branch
    assert float((one - r.images[1, 3]).abs().max()) <= TOL


@pytest.mark.parametrize("name", ["dpm++2m", "euler-a", "lms"])
def test_more_roots_are_independent_from_step_0_and_replay_alone(comp, conditioning, rendered, name):
    plan = small_plan(name, batch=8, steps=6, roots=4)
    r = render(comp, *conditioning, plan)
    assert r.schedule == [0, 0, 4] and r.roots.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert r.unet_evals == 2 * 2 * (4 * 5 + 8 * 1)
    # the roots draw their members' streams from step 0, as a plain batch's first four do
    p = render(comp, *conditioning, plain(plan))
    assert float((p.images[:, :4] - r.images[:, :4]).abs().max()) <= TOL
    cond, neg, cfg = conditioning
    one = render_one(comp, cond[:1], neg, cfg[:1], plan, r.lineage[6])  # a copy of root 2
    assert float((one - r.images[0, 6]).abs().max()) <= TOL


def test_copying_a_latent_under_an_ode_sampler_gives_identical_images(comp, conditioning, rendered):
    """Without re-noise (rho = 0) the deterministic sampler's siblings split after step 0
    stay on one path: the bug the branch re-noise fixes. (The step-0 copy is a second root.)"""
    same = render(comp, *conditioning, small_plan("dpm++2m", renoise=0.0)).images
    d = pair_distances(same[0])  # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert float(d[[1, 4]].max()) < 1e-5 and float(d[[0, 2, 3, 5]].min()) > 1e-2
    assert float(pair_distances(rendered("dpm++2m").images[0]).min()) > 100 * 1e-5


def test_results_do_not_depend_on_chunk_size(comp, conditioning, rendered):
    small = render(comp, *conditioning, small_plan("dpm++2m", max_batch=2))
    assert float((small.images - rendered("dpm++2m").images).abs().max()) <= TOL
    assert small.unet_evals == rendered("dpm++2m").unet_evals


@pytest.mark.parametrize("name", ["euler-a", "unipc"])
def test_plain_mode_is_independent_latents_whose_first_is_the_trunk(comp, conditioning, rendered, name):
    p = render(comp, *conditioning, plain(small_plan(name)))
    assert p.lineage.tolist() == [[0], [1], [2], [3]] and p.schedule == []
    assert p.unet_evals == 2 * 2 * 4 * 4
    assert float(pair_distances(p.images[0]).min()) > 1e-2
    # member 0 is never re-noised and draws the same stream in both modes
    assert float((p.images[:, 0] - rendered(name).images[:, 0]).abs().max()) <= TOL


def test_img2img_per_candidate_strength(comp, conditioning):
    init = torch.from_numpy(shapes_batch(np.random.default_rng(0), 1)[0][:, :, ::2, ::2].copy())
    plan = small_plan("dpm++2m")
    cond, neg, cfg = conditioning
    r = render(comp, cond, neg, cfg, plan, init_image=init, strength=torch.tensor([0.0, 0.8]))
    # strength 0: no step at all, the init image's VAE round trip; strength 0.8: steps 1
    # and 2 (2 latents; the last branch after step 2's evaluation), step 3 (4 latents)
    with torch.no_grad():
        assert float((r.images[0] - decode(comp.vae, encode(comp.vae, init))).abs().max()) <= TOL
    assert r.unet_evals == 2 * (2 + 2 + 4)
    assert float(pair_distances(r.images[1]).min()) > 1e-4
    one = render_one(comp, cond[1:], neg, cfg[1:], plan, r.lineage[3], init_image=init, strength=0.8)
    assert float((one - r.images[1, 3]).abs().max()) <= TOL
    with pytest.raises(ConfigError, match="strength"):
        render(comp, cond, neg, cfg, plan, init_image=init, strength=torch.tensor([0.2, 1.5]))


def test_render_one_rejects_a_foreign_lineage_row(comp, conditioning):
    cond, neg, cfg = conditioning
    with pytest.raises(ConfigError, match="lineage"):
        render_one(comp, cond[:1], neg, cfg[:1], small_plan("euler"), torch.tensor([0, 0, 3]))
