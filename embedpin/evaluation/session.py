"""Everything heavy a run holds, prepared once and validated before any run folder exists.

``Session.prepare(config)`` loads the model, the targets, the guide / init images, builds
the guidance context, the search space and the scorer. ``Session.evaluate(X, g)``:
(standardized candidates, generation) -> conditionings, images, losses as tensors, with no
global state. ``Session.batch(X, plan)`` is the same as the run loop receives it, wherever the
session lives (this process or a Ray worker): a compact, numpy-only
:class:`~embedpin.evaluation.batch.Batch`; ``plain_batch(plan)`` does it for the plain prompt and
``pinned(x)`` gives the conditioning a pinned result file holds. The run's validation renders
are batches on the validation plan (plain batches on seeds no search render uses,
``evaluation.seeds``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from embedpin.config import RunConfig
from embedpin.errors import ConfigError
from embedpin.evaluation.batch import Batch, Pinned, RunInfo, Starts
from embedpin.evaluation.inversion import InversionSettings, checkpoint_steps, invert_path
from embedpin.evaluation.seeds import search_seed, validation_seed
from embedpin.guidance.build import Conditioning, build, distance
from embedpin.guidance.context import GuidanceContext, GuidanceOptions, make_context
from embedpin.guidance.emphasis import BREAK, parse_emphasis
from embedpin.guidance.encode import encode_negative, encode_prompt, input_widths
from embedpin.guidance.interrogate import rank_words
from embedpin.guidance.tokens import chunk_count
from embedpin.images import load_image, resize_crop
from embedpin.models.embeddings import read_textual_inversion
from embedpin.models.loader import load_components
from embedpin.optimizer.space import SearchSpace
from embedpin.render.memory import probe_max_batch
from embedpin.render.sampler import RenderPlan, RenderResult, render
from embedpin.render.size import render_size, size_multiple
from embedpin.scoring.masks import readable_targets, target_masks
from embedpin.scoring.scorer import Scorer, ScoreResult
from embedpin.scoring.targets import expand_paths, load_targets
from embedpin.store import INVERSION, RunStore, read_vectors, to_uint8

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


def guidance_options(config: RunConfig, init_word: str | None = None, n_vectors: int | None = None) -> GuidanceOptions:
    """The run's guidance options; ``init_word`` replaces the config's (``auto`` resolved),
    ``n_vectors`` the number of placeholders (an init embedding's rows)."""
    search = config.search
    if n_vectors is None:
        n_vectors = search.n_vectors if "token_vectors" in search.blocks else 0
    return GuidanceOptions(
        clip_skip=config.prompt.clip_skip, delta_basis=search.basis, delta_k=search.rank,
        n_vectors=n_vectors, vector_k=search.rank,
        vector_basis="random" if search.basis == "random" else "pca", init_word=init_word or search.init_word,
        seed=config.optim.seed, cfg=config.render.cfg, strength=config.render.strength,
        placeholders_first=search.placement == "before")


def auto_init_words(config: RunConfig, components, targets: torch.Tensor | None) -> str:
    """``--init-word auto``: the vocabulary words CLIP ranks highest for the targets, one per
    placeholder, leaving out the prompt's own words (``guidance.interrogate``). Without target
    images or an image CLIP: the end-of-text token, the prompt's own padding, so the search
    starts exactly at the plain prompt."""
    if targets is None or components.clip is None:
        return components.tokenizer.eos_token
    text = " ".join(t for t, w in parse_emphasis(config.prompt.prompt) if w != BREAK)
    prompt_words = text.replace(",", " ").split()
    ranked = rank_words(components, targets, exclude=prompt_words, n=config.search.n_vectors)
    if not ranked:
        raise ConfigError("--init-word auto found no vocabulary word outside the prompt")
    return ",".join(w for w, _ in ranked)


def render_plan(config: RunConfig) -> RenderPlan:
    """The search's render plan from a run config whose model defaults are filled in
    (:meth:`RunConfig.for_model`)."""
    settings = config.render
    return RenderPlan(batch=settings.batch, steps=settings.steps, scheduler=settings.scheduler, height=settings.height,
                      width=settings.width, seed=config.optim.seed, hyperbatch=settings.hyperbatch,
                      max_batch=settings.max_batch, renoise=settings.renoise, roots=settings.roots)


def _aspect(config: RunConfig, init: torch.Tensor | None) -> float | None:
    """Width / height of the first target (else the init image; None: square)."""
    first = load_image(expand_paths(config.score.targets)[0]) if config.score.targets else init
    return None if first is None else first.shape[-1] / first.shape[-2]


def for_model(config: RunConfig, comp, init: torch.Tensor | None) -> RunConfig:
    """The run config with the model's defaults (steps, CFG, sampler), the render size
    (:func:`~embedpin.render.size.render_size`) and the UNet batch (``auto``: probed) filled in."""
    height, width = render_size(config.render, comp.default_size, size_multiple(comp), _aspect(config, init))
    batch = config.render.max_batch or probe_max_batch(comp, height, width)
    return config.for_model(comp.profile, height, width, batch)


def search_plan(config: RunConfig, plan: RenderPlan, generation: int) -> RenderPlan:
    """The plan of generation ``generation``'s search renders: ``plan`` with its seed (``evaluation.seeds``)."""
    optim = config.optim
    return replace(plan, seed=search_seed(optim.seed, generation, optim.search_seeds))


def guide_images(config: RunConfig, guide: list, targets: torch.Tensor | None, towers: bool) -> list:
    """The run's guide images: those given (``--guide``), else with ``--guide-target`` the targets
    (as the run may read them: ``scoring.masks.readable_targets``), when a searched block reads
    guide images and the model has an image tower to read them."""
    if config.prompt.guide_target and not guide and targets is not None and config.uses_guide() and towers:
        return list(targets)
    return guide


def validation_plan(config: RunConfig, plan):
    """Plain batches of ``validation_seeds`` images on the run's validation seed (None: off)."""
    n = config.optim.validation_seeds
    return replace(plan, batch=n, hyperbatch=False, seed=validation_seed(config.optim.seed)) if n else None


def _cut_text_target(components, text: str | None) -> list[str]:
    """A note when CLIP's text tower will cut the text target (its window is 77 positions)."""
    if not text or components.clip is None:
        return []
    window = int(components.clip.config.text_config.max_position_embeddings)
    n = len(components.tokenizer(text, add_special_tokens=False).input_ids)
    if n <= window - 2:
        return []
    return [f"--text-target is {n} tokens; CLIP's text tower reads only the first {window - 2}, the rest is cut"]


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
    notes: list[str] = field(default_factory=list)  # what the setup means for the result (stderr, report)
    masks: torch.Tensor | None = None  # [T, 1, H, W] on the device, one per target (None: no --mask)

    def search_plan(self, generation: int):
        """The plan of generation ``generation``'s search renders (its seed: ``evaluation.seeds``)."""
        return search_plan(self.config, self.plan, generation)

    @classmethod
    def prepare(cls, config: RunConfig, components: Components | None = None) -> Session:
        """Everything the run holds, from ``config`` (``components``: a model already loaded, used
        as it is, on its own device and dtype, instead of loading ``config.model``)."""
        config.validate()
        prompt, score = config.prompt, config.score
        # 1. inputs a user can get wrong, before anything heavy
        guide = [load_image(g) for g in prompt.guide]  # (the targets, resized, with --guide-target)
        init = load_image(prompt.init_image) if prompt.init_image else None
        comp = components or load_components(config.model.name, device=pick_device(config.model.device),
                                             dtype=getattr(torch, config.model.dtype), clip=config.model.clip,
                                             model_config=config.model.model_config)
        config = for_model(config, comp, init)
        plan = render_plan(config).validate(comp.vae_scale_factor)
        size = (plan.height, plan.width)
        targets = load_targets(score.targets, size).to(comp.device) if score.targets else None
        masks = target_masks(score.masks, score.targets, size) if score.targets else None
        seen = readable_targets(targets, masks.masks.to(comp.device) if masks else None)  # what guides and ranks
        if init is not None:
            init = resize_crop(init, size).to(comp.device)
        notes = list(masks.notes) if masks else []
        if prompt.guide_target and not guide and targets is not None and config.uses_guide() and not comp.towers:
            notes.append("no image CLIP tower for this model, so the targets do not guide the prompt (image "
                         "guidance is off); pass --clip (SD 1.x / SDXL: openai/clip-vit-large-patch14) to use it")
        guide = guide_images(config, guide, seen, bool(comp.towers))
        # 2. per-run precomputation: guidance context, search space, scorer
        vectors = read_textual_inversion(config.search.init_embedding, input_widths(comp), comp.family) \
            if config.search.init_embedding else None
        auto = config.search.init_word.strip() == "auto" and vectors is None
        words = auto_init_words(config, comp, seen) if auto else None
        options = guidance_options(config, words, None if vectors is None else len(vectors))
        ctx = make_context(comp, prompt.prompt, prompt.negative, guide=[g[None].to(comp.device) for g in guide] or None,
                           concepts=prompt.concepts, init_image=init[None] if init is not None else None,
                           options=options, init_vectors=vectors)
        space = SearchSpace(ctx.blocks(config.search.blocks))
        if space.n == 0:
            raise ConfigError("nothing to search: the guidance blocks need a --guide image (or --guide-target)")
        if (score.clip_weight > 0 or score.text_target) and comp.clip is None:
            raise ConfigError("the CLIP loss needs an image CLIP model: pass --clip")
        scorer = Scorer(comp, targets, flip_weight=score.flip_weight, clip_weight=score.clip_weight,
                        text_target=score.text_target, std_weight=score.std_weight,
                        hyperbatch_weighting=score.weighting, hyperbatch_scale=score.weighting_scale, ppd=score.ppd,
                        masks=masks.masks.to(comp.device) if masks else None)
        notes += [ctx.guidance_note] if ctx.guidance_note else []
        notes += _cut_text_target(comp, score.text_target)
        return cls(config, comp, ctx, space, scorer, plan, targets, guide, validation_plan(config, plan), notes,
                   masks.masks.to(comp.device) if masks else None)

    def invert(self, progress=None) -> Starts:
        """The search's possible starts: the run's init vectors, then the token vectors at K evenly
        spaced points (``--inversion-starts``; with validation or the choice off, the end alone) of
        their fit to the targets by textual inversion (:mod:`embedpin.evaluation.inversion`), with
        the run's seed."""
        search = self.config.search
        settings = InversionSettings(steps=search.inversion_steps, batch=search.inversion_batch,
                                     lr=search.inversion_lr, seed=self.config.optim.seed)
        init, points = self.ctx.vector_init, self.config.inversion_points()
        path = invert_path(self.ctx, self.targets, settings, self.masks, progress, points=points)
        return Starts(torch.cat([init[None].to(path), path]).detach().float().cpu().numpy(),
                      (0, *checkpoint_steps(settings.steps, points)))

    @classmethod
    def of_run(cls, run: RunStore, config: RunConfig | None = None) -> Session:
        """The session of a run folder (``store.RunStore``; ``config``: its config, changed, e.g. the
        device), with the token vectors its inversion stage fitted as the search's x = 0, so that
        its records' parameters decode to what the run rendered."""
        session = cls.prepare(config or run.config())
        if run.state.inversion is not None and run.state.inversion.steps:
            session.use_vectors(read_vectors(run.root / INVERSION))
        return session

    def use_vectors(self, vectors: np.ndarray | None) -> None:
        """Start the token vectors (the search's x = 0) at ``vectors`` [N, Din] (an inversion's)
        instead of the init words; the search space keeps its shape."""
        if vectors is None:
            return
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if self.ctx.vector_init is not None and torch.equal(v.to(self.ctx.vector_init), self.ctx.vector_init):
            return
        self.ctx = self.context_without(None, v)

    def info(self) -> RunInfo:
        """What the driver needs to know of this session without loading the model itself."""
        return RunInfo(config=self.config.to_dict(), space=self.space.to_dict(), family=self.components.family,
                       widths=list(input_widths(self.components)), towers=len(self.components.towers),
                       notes=list(self.notes), device=str(self.components.device), tokens=self.ctx.plain.labels)

    def conditioning(self, params: dict[str, np.ndarray]) -> Conditioning:
        """The candidates' conditionings from decoded parameters {block: [λ, size]} (a record's
        stored parameters: ``{block: [values]}`` with λ = 1)."""
        like = self.ctx.plain.hidden
        return build(self.ctx, {k: torch.as_tensor(np.atleast_2d(np.asarray(v, dtype=np.float64))).to(like)
                                for k, v in params.items()})

    def context_without(self, k: int | None, vectors: torch.Tensor | None) -> GuidanceContext:
        """This run's guidance context with the placeholders at ``vectors`` [N, Din] (a pinned
        result's; None: no placeholders) and the prompt's token ``k`` left out (None: none; token
        analysis). Leave a placeholder out by leaving its row out of ``vectors``."""
        c, comp = self.config, self.components
        options = replace(self.ctx.options, n_vectors=0 if vectors is None else len(vectors), omit_token=k)
        return make_context(comp, c.prompt.prompt, c.prompt.negative,
                            guide=[g[None].to(comp.device) for g in self.guide] or None,
                            concepts=c.prompt.concepts, init_image=self.ctx.init_image, options=options,
                            init_vectors=vectors)

    def render_scored(self, cond: Conditioning, plan: RenderPlan) -> tuple[RenderResult, ScoreResult]:
        """Render ``cond``'s candidates on ``plan`` and score them."""
        return self._render(cond, plan)

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

    @torch.no_grad()
    def plain_conditioning(self) -> Conditioning:
        """The plain prompt as written (its emphasis; no placeholders, no block applied), with
        the negative padded to the same chunks."""
        c, comp = self.config, self.components
        chunks = max(chunk_count(comp, c.prompt.prompt), chunk_count(comp, c.prompt.negative))
        enc = encode_prompt(comp, c.prompt.prompt, c.prompt.clip_skip, chunks=chunks)
        neg = self.ctx.negative if self.ctx.negative.chunks == chunks else \
            encode_negative(comp, c.prompt.negative, c.prompt.clip_skip, chunks)
        strength = torch.tensor([c.render.strength]) if self.ctx.init_image is not None else None
        return Conditioning(enc.hidden, neg.hidden, enc.hidden.new_tensor([c.render.cfg]), strength,
                            pooled_embeds=enc.pooled, negative_pooled=neg.pooled)

    @torch.no_grad()
    def render_plain_validation(self):
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
