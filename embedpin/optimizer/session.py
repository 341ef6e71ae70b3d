"""Everything heavy a run holds, prepared once and validated before any run folder exists.

``Session.prepare(config)`` loads the model, the targets, the guide / init images, builds
the guidance context, the search space and the scorer. ``Session.evaluate(X, g)``:
(standardized candidates, generation) -> conditionings, images, losses as tensors, with no
global state. ``Session.batch(X, plan)`` is the same as the run loop receives it, wherever the
session lives (this process or a Ray worker): a compact, numpy-only
:class:`~embedpin.optimizer.batch.Batch`; ``plain_batch(plan)`` does it for the plain prompt and
``pinned(x)`` gives the conditioning a pinned result file holds. ``Session.validate(X)`` renders
candidates as a user would (plain batches) on the run's validation seeds, which no search render
uses (``optimizer.seeds``); ``Session.validate_plain()`` does the same for the plain prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from embedpin.config import RunConfig
from embedpin.errors import ConfigError
from embedpin.guidance.build import Conditioning, build, distance
from embedpin.guidance.context import GuidanceContext, GuidanceOptions, make_context
from embedpin.guidance.encode import encode_prompt, input_widths
from embedpin.guidance.interrogate import rank_words
from embedpin.images import load_image, resize_crop
from embedpin.models.loader import load_components
from embedpin.optimizer.batch import Batch, Pinned, RunInfo
from embedpin.optimizer.seeds import search_seed, validation_seed
from embedpin.render.sampler import RenderPlan, RenderResult, render
from embedpin.scoring.scorer import Scorer, ScoreResult
from embedpin.scoring.targets import load_targets
from embedpin.space import SearchSpace
from embedpin.store import to_uint8

if TYPE_CHECKING:
    from embedpin.models.components import Components


def pick_device(name: str) -> str:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def guidance_options(config: RunConfig, init_word: str | None = None) -> GuidanceOptions:
    """The run's guidance options; ``init_word`` replaces the config's (``auto`` resolved)."""
    search = config.search
    return GuidanceOptions(
        clip_skip=config.prompt.clip_skip, delta_basis=search.basis, delta_k=search.rank,
        n_vectors=search.n_vectors if "token_vectors" in search.blocks else 0, vector_k=search.rank,
        vector_basis="random" if search.basis == "random" else "pca", init_word=init_word or search.init_word,
        seed=config.optim.seed, cfg=config.render.cfg, strength=config.render.strength)


def auto_init_words(config: RunConfig, components, targets: torch.Tensor | None) -> str:
    """``--init-word auto``: the vocabulary words CLIP ranks highest for the targets, one per
    placeholder, leaving out the prompt's own words (``guidance.interrogate``). Without target
    images or an image CLIP: the end-of-text token, the prompt's own padding, so the search
    starts exactly at the plain prompt."""
    if targets is None or components.clip is None:
        return components.tokenizer.eos_token
    prompt_words = config.prompt.prompt.replace(",", " ").split()
    ranked = rank_words(components, targets, exclude=prompt_words, n=config.search.n_vectors)
    if not ranked:
        raise ConfigError("--init-word auto found no vocabulary word outside the prompt")
    return ",".join(w for w, _ in ranked)


def render_plan(config: RunConfig, size: int) -> RenderPlan:
    """The search's render plan at ``size`` (square) from the run config."""
    settings = config.render
    return RenderPlan(batch=settings.batch, steps=settings.steps, scheduler=settings.scheduler, height=size, width=size,
                      seed=config.optim.seed, hyperbatch=settings.hyperbatch, max_batch=settings.max_batch,
                      renoise=settings.renoise, roots=settings.roots)


def search_plan(config: RunConfig, plan: RenderPlan, generation: int) -> RenderPlan:
    """The plan of generation ``generation``'s search renders: ``plan`` with its seed (``optimizer.seeds``)."""
    optim = config.optim
    return replace(plan, seed=search_seed(optim.seed, generation, optim.search_seeds))


def guide_images(config: RunConfig, guide: list, targets: torch.Tensor | None) -> list:
    """The run's guide images: those given (``--guide``), else with ``--guide-target`` the targets,
    when a searched block reads guide images."""
    if config.prompt.guide_target and not guide and targets is not None and config.uses_guide():
        return list(targets)
    return guide


def validation_plan(config: RunConfig, plan):
    """Plain batches of ``validation_seeds`` images on the run's validation seed (None: off)."""
    n = config.optim.validation_seeds
    return replace(plan, batch=n, hyperbatch=False, seed=validation_seed(config.optim.seed)) if n else None


@dataclass
class Evaluation:
    """One generation's candidates, rendered and scored (tensors stay on the device)."""
    params: dict[str, np.ndarray]
    cond: Conditioning
    render: RenderResult
    score: ScoreResult
    distance: torch.Tensor   # [λ]


@dataclass
class Session:
    config: RunConfig
    components: Components
    ctx: GuidanceContext
    space: SearchSpace
    scorer: Scorer
    plan: RenderPlan         # generation 0's search renders
    targets: torch.Tensor | None
    guide: list[torch.Tensor]
    validation: RenderPlan | None = None  # the validation renders' plan; None: validation off

    def search_plan(self, generation: int):
        """The plan of generation ``generation``'s search renders (its seed: ``optimizer.seeds``)."""
        return search_plan(self.config, self.plan, generation)

    @classmethod
    def prepare(cls, config: RunConfig) -> Session:

        config.validate()
        prompt, score = config.prompt, config.score
        # 1. inputs a user can get wrong, before anything heavy
        guide = [load_image(g) for g in prompt.guide]  # (the targets, resized, with --guide-target)
        init = load_image(prompt.init_image) if prompt.init_image else None
        dtype = getattr(torch, config.model.dtype)
        comp = load_components(config.model.name, device=pick_device(config.model.device), dtype=dtype,
                               clip=config.model.clip, model_config=config.model.model_config)
        size = config.render.size or comp.default_size
        plan = render_plan(config, size).validate(comp.vae_scale_factor)
        targets = load_targets(score.targets, (size, size)).to(comp.device) if score.targets else None
        if init is not None:
            init = resize_crop(init, (size, size)).to(comp.device)
        guide = guide_images(config, guide, targets)
        # 2. per-run precomputation: guidance context, search space, scorer
        words = auto_init_words(config, comp, targets) if config.search.init_word.strip() == "auto" else None
        ctx = make_context(comp, prompt.prompt, prompt.negative, guide=[g[None].to(comp.device) for g in guide] or None,
                           concepts=prompt.concepts, init_image=init[None] if init is not None else None,
                           options=guidance_options(config, words))
        space = SearchSpace(ctx.blocks(config.search.blocks))
        if space.n == 0:
            raise ConfigError("nothing to search: the guidance blocks need a --guide image (or --guide-target)")
        if (score.clip_weight > 0 or score.text_target) and comp.clip is None:
            raise ConfigError("the CLIP loss needs an image CLIP model: pass --clip")
        scorer = Scorer(comp, targets, flip_weight=score.flip_weight, clip_weight=score.clip_weight,
                        text_target=score.text_target, std_weight=score.std_weight,
                        hyperbatch_weighting=score.weighting, hyperbatch_scale=score.weighting_scale, ppd=score.ppd)
        return cls(config, comp, ctx, space, scorer, plan, targets, guide, validation_plan(config, plan))

    def info(self) -> RunInfo:
        """What the driver needs to know of this session without loading the model itself."""
        return RunInfo(space=self.space.to_dict(), size=self.plan.height, family=self.components.family,
                       widths=list(input_widths(self.components)), note=self.ctx.guidance_note or None,
                       device=str(self.components.device))

    def conditioning(self, params: dict[str, np.ndarray]) -> Conditioning:
        """The candidates' conditionings from decoded parameters {block: [λ, size]}."""
        like = self.ctx.plain.hidden
        return build(self.ctx, {k: torch.as_tensor(v).to(like) for k, v in params.items()})

    def _render(self, cond: Conditioning, plan: RenderPlan) -> tuple[RenderResult, ScoreResult]:
        out = render(self.components, cond.prompt_embeds, cond.negative_embeds, cond.cfg, plan,
                     init_image=self.ctx.init_image, strength=cond.strength, **cond.pooled())
        return out, self.scorer(out.images, out.lineage, out.roots)

    @torch.no_grad()
    def evaluate(self, X: np.ndarray, generation: int = 0, plan=None) -> Evaluation:
        """Standardized candidates X [λ, n] -> conditionings, renders [λ, B, 3, H, W], losses [λ],
        rendered with generation ``generation``'s search plan (or ``plan``)."""
        params = self.space.decode(X)
        cond = self.conditioning(params)
        out, score = self._render(cond, plan or self.search_plan(generation))
        return Evaluation(params, cond, out, score, distance(self.ctx, cond))

    def batch(self, X: np.ndarray, plan: RenderPlan, worker: str = "local") -> Batch:
        """:meth:`evaluate` on ``plan`` as the run loop receives it: a compact :class:`Batch`."""
        t0 = time.perf_counter()
        ev = self.evaluate(X, plan=plan)
        return _compact(ev.params, ev.render, ev.score, ev.distance, worker, t0)

    @torch.no_grad()
    def plain_batch(self, plan: RenderPlan, worker: str = "local") -> Batch:
        """The plain prompt rendered on ``plan`` and scored, as a one-candidate :class:`Batch`."""
        t0 = time.perf_counter()
        out, score = self._render(self.plain_conditioning(), plan)
        return _compact({}, out, score, torch.zeros(1), worker, t0)

    @torch.no_grad()
    def pinned(self, x: np.ndarray | None) -> Pinned:
        """The conditioning of candidate ``x`` [n] (None: the plain prompt) as a pinned result holds it."""
        cond = self.plain_conditioning() if x is None else self.conditioning(self.space.decode(np.asarray(x)[None]))
        return Pinned(cond.tensors(0), float(cond.cfg[0]))

    def validate(self, X: np.ndarray) -> Evaluation:
        """Candidates X [k, n] rendered as plain batches on the validation seeds, scored."""
        if self.validation is None:
            raise ConfigError("validation is off (--validation-seeds 0)")
        return self.evaluate(X, plan=self.validation)

    @torch.no_grad()
    def plain_conditioning(self) -> Conditioning:
        """The plain prompt's conditioning: no placeholders, no block applied."""
        c = self.config
        enc = encode_prompt(self.components, c.prompt.prompt, c.prompt.clip_skip)
        hidden = enc.hidden
        strength = torch.tensor([c.render.strength]) if self.ctx.init_image is not None else None
        return Conditioning(hidden, self.ctx.negative.hidden, hidden.new_tensor([c.render.cfg]), strength,
                            pooled_embeds=enc.pooled, negative_pooled=self.ctx.negative.pooled)

    @torch.no_grad()
    def validate_plain(self):
        """The plain prompt on the validation seeds: (its Conditioning, RenderResult, ScoreResult)."""
        cond = self.plain_conditioning()
        return (cond, *self._render(cond, self.validation))


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def _compact(params: dict, out: RenderResult, score: ScoreResult, dist: torch.Tensor, worker: str,
             t0: float) -> Batch:
    """An evaluation's tensors as the :class:`Batch` the driver keeps (images as uint8)."""
    k = out.images.shape[0]
    return Batch(loss=score.loss.double().cpu().numpy(), flip=_numpy(score.flip), clip=_numpy(score.clip),
                 per_image=_numpy(score.per_image), distance=dist.double().cpu().numpy(),
                 params={name: np.asarray(v, dtype=np.float64) for name, v in params.items()},
                 images=to_uint8(out.images), lineage=_numpy(out.lineage).astype(np.int64),
                 seeds=_numpy(out.seeds).astype(np.int64), unet_evals=int(out.unet_evals),
                 seconds={worker: time.perf_counter() - t0}, worker=[worker] * k)
