"""One typed config tree for a pinning run: dataclasses, validated at the boundary,
written beside the run as ``config.toml`` (everything needed to reproduce it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedpin.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BLOCKS = ("guidance", "cfg", "strength", "token_weights", "delta", "token_vectors", "linear_start", "linear_end",
          "clustered", "threshold", "threshold_floor", "max_image", "header_cap", "concept")
BASES = ("image", "pca", "random")
WEIGHTINGS = ("none", "geometric", "exponential", "polynomial")
SEED_SCHEDULES = ("rotate", "fixed")
DTYPES = ("float32", "float16", "bfloat16")
KEEP_IMAGES = ("best", "all")
PLACEMENTS = ("before", "after")
# ꟻLIP's viewing condition (Andersson et al. 2020, sec. 5): a 0.7 m wide 3840-pixel monitor seen from 0.7 m,
# in pixels per degree of visual angle (67.02): the run's default and the library's.
FLIP_PPD = 0.7 * (3840 / 0.7) * math.pi / 180


@dataclass
class ModelConfig:
    name: str = "micro"          # micro | diffusers folder | hub id | .safetensors file
    clip: list[str] = field(default_factory=list)  # image towers (folders / hub ids); micro ships its own
    model_config: str | None = None  # single-file checkpoints: a shipped config's name or a diffusers folder
    device: str = "auto"         # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"


@dataclass
class PromptConfig:
    prompt: str = ""
    negative: str = ""
    guide: list[str] = field(default_factory=list)   # guide image(s) for image guidance
    concepts: str | None = None                       # second prompt selecting image features
    init_image: str | None = None                     # img2img init image
    clip_skip: int = 0
    guide_target: bool = True                         # no --guide: the targets are the guide images


@dataclass
class SearchConfig:
    blocks: list[str] = field(default_factory=lambda: ["token_vectors"])
    basis: str = "pca"           # basis of the delta / token vectors: image | pca | random
    rank: int = 16               # K: basis size of the delta / token-vector blocks
    n_vectors: int = 4           # textual-inversion placeholder tokens
    init_word: str = "auto"      # token vectors start here: a word, words "a,b" (one per vector), or "auto"
    init_embedding: str | None = None  # or at an existing textual-inversion file's vectors (.safetensors)
    placement: str = "before"    # where the placeholders stand in the usage prompt: before | after its words
    inversion_steps: int = 300   # gradient textual inversion of the token vectors before the search (0: off)
    inversion_batch: int = 16    # (target, timestep, noise) samples per inversion step
    inversion_lr: float = 1.0    # Adam's step per coordinate, in typical coordinates of the token table


@dataclass(frozen=True)
class ModelDefaults:
    """What a model family's users render with: the run's defaults for a model of it (its
    native size comes from the model itself)."""

    steps: int
    cfg: float
    scheduler: str


MODEL_DEFAULTS = {  # by Components.profile
    "micro": ModelDefaults(steps=12, cfg=5.0, scheduler="dpm++2m"),
    "SD 1.x": ModelDefaults(steps=20, cfg=7.0, scheduler="dpm++2m-karras"),
    "SD 2.x": ModelDefaults(steps=20, cfg=7.0, scheduler="dpm++2m-karras"),
    "SDXL": ModelDefaults(steps=25, cfg=6.0, scheduler="dpm++2m-karras"),
}
MICRO = MODEL_DEFAULTS["micro"]


def by_model(field_name: str) -> str:
    """``"micro 12, SD 1.x 20, ..."``: a model-dependent default, for --help."""
    return ", ".join(f"{k} {getattr(v, field_name)}" for k, v in MODEL_DEFAULTS.items())


@dataclass
class RenderConfig:
    batch: int = 8
    steps: int | None = None     # None: the model's (MODEL_DEFAULTS)
    scheduler: str | None = None  # None: the model's
    size: int | None = None      # square shorthand for width = height
    width: int | None = None     # None: from the first target's aspect ratio at the model's native area
    height: int | None = None
    cfg: float | None = None     # None: the model's
    hyperbatch: bool = True
    max_batch: int | None = None  # images per UNet call; None: auto (GPU: the most that fits, probed; CPU: 256)
    strength: float = 0.6        # img2img strength (with init_image)
    renoise: float | None = None  # eta of a copy's ancestral step at a branch (None: 1 for ODE samplers)
    roots: int = 2               # independent initial latents per candidate in a hyperbatch


@dataclass
class ScoreConfig:
    targets: list[str] = field(default_factory=list)  # files / folders; empty = self mode
    masks: list[str] = field(default_factory=list)    # white = pin, black = ignore: none, one for all, or one per target
    text_target: str | None = None
    flip_weight: float = 1.0
    clip_weight: float = 0.0
    std_weight: float = 0.5
    weighting: str = "none"      # hyperbatch weighting over lineage depth
    weighting_scale: float = 1.0
    ppd: float = FLIP_PPD


@dataclass
class OptimConfig:
    population: int | None = None   # None: 4 + 3 ln N
    generations: int | None = None  # None: 8 after an inversion stage, else 16 floor(ln N)
    sigma0: float = 0.5
    seed: int = 0
    max_distance: float | None = None
    tol_fun: float = 1e-6
    tol_x: float = 1e-6
    search_seeds: str = "rotate"    # rotate: new render seeds every generation; fixed: the same ones
    validation_seeds: int = 16      # plain renders per validated candidate on seeds the search never uses


@dataclass
class ScaleConfig:
    """Where a run's candidates are rendered: in this process (``workers`` 0, no address) or on
    Ray workers (``embedpin.optimizer.ray_workers``). Not part of the recipe: a run renders the
    same on any number of workers, so these settings are given per invocation (``--workers``,
    ``--ray-address`` or ``RAY_ADDRESS``, also with ``--resume``) and never written to config.toml."""

    workers: int = 0                # 0: in-process; N: N Ray workers (one per GPU where there are GPUs)
    ray_address: str | None = None  # join the Ray cluster there (``ray start --head``) instead of starting one
    worker_timeout: float = 600.0   # seconds one chunk may take before its worker counts as hung (a model load: >= 600)
    worker_restarts: int = 3        # restarts of a dead or hung worker (each reloads the model) before it is given up

    @property
    def distributed(self) -> bool:
        """Whether candidates render on Ray workers."""
        return self.workers > 0 or self.ray_address is not None

    def validate(self) -> ScaleConfig:
        _check(self.workers >= 0, f"--workers must be >= 0 (got {self.workers})")
        _check(self.ray_address is None or bool(self.ray_address.strip()), "--ray-address must not be empty")
        _check(self.worker_timeout > 0, f"--worker-timeout must be > 0 (got {self.worker_timeout})")
        _check(self.worker_restarts >= 0, f"--worker-restarts must be >= 0 (got {self.worker_restarts})")
        return self


# Blocks that need guide images ("guidance" stands for those the run's guide images allow).
GUIDED_BLOCKS = frozenset({"linear_start", "linear_end", "clustered", "threshold", "threshold_floor", "max_image",
                           "header_cap", "concept"})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "runs"
    keep_images: str = "best"  # best: at 256² and up, thumbnails of all, full PNGs of each generation's best; all

    def validate(self) -> RunConfig:
        """Check every range a user can get wrong; raise ConfigError with one line."""
        render, search, optim, score, prompt = self.render, self.search, self.optim, self.score, self.prompt
        _check(render.batch >= 1, f"--batch must be >= 1 (got {render.batch})")
        _check(render.steps is None or render.steps >= 1, f"--steps must be >= 1 (got {render.steps})")
        for name in ("size", "width", "height"):
            value = getattr(render, name)
            _check(value is None or value >= 8, f"--{name} must be >= 8 (got {value})")
        _check(render.size is None or (render.width is None and render.height is None),
               "give --size (a square) or --width / --height, not both")
        _check(render.max_batch is None or render.max_batch >= 2, f"--max-batch must be >= 2 or auto (got "
                                                                   f"{render.max_batch})")
        _check(0.0 <= render.strength <= 1.0, f"--strength must be in [0, 1] (got {render.strength})")
        _check(render.cfg is None or render.cfg >= 0, f"--cfg must be >= 0 (got {render.cfg})")
        _check(self.keep_images in KEEP_IMAGES, f"--keep-images must be one of {', '.join(KEEP_IMAGES)} "
                                                f"(got {self.keep_images!r})")
        _check(render.renoise is None or render.renoise >= 0, f"--renoise must be >= 0 (got {render.renoise})")
        unknown = [b for b in search.blocks if b not in BLOCKS]
        _check(not unknown, f"unknown search block(s) {unknown}; choose from {', '.join(BLOCKS)}")
        _check(len(search.blocks) > 0, "at least one search block must be on")
        _check(search.basis in BASES, f"--basis must be one of {', '.join(BASES)} (got {search.basis!r})")
        _check(search.rank >= 1, f"--rank must be >= 1 (got {search.rank})")
        _check(search.n_vectors >= 1, f"--vectors must be >= 1 (got {search.n_vectors})")
        _check(search.placement in PLACEMENTS, f"--placement must be one of {', '.join(PLACEMENTS)} "
                                               f"(got {search.placement!r})")
        _check(search.inversion_steps >= 0, f"--inversion-steps must be >= 0 (got {search.inversion_steps})")
        _check(search.inversion_batch >= 1, f"--inversion-batch must be >= 1 (got {search.inversion_batch})")
        _check(search.inversion_lr > 0, f"--inversion-lr must be > 0 (got {search.inversion_lr})")
        _check(optim.population is None or optim.population >= 2, f"--population must be >= 2 (got {optim.population})")
        _check(optim.generations is None or optim.generations >= 1, f"--generations must be >= 1 (got {optim.generations})")
        _check(optim.sigma0 > 0, f"--sigma0 must be > 0 (got {optim.sigma0})")
        _check(optim.max_distance is None or optim.max_distance > 0, "--max-distance must be > 0")
        _check(optim.search_seeds in SEED_SCHEDULES, f"--search-seeds must be one of {', '.join(SEED_SCHEDULES)}")
        _check(optim.validation_seeds >= 0, f"--validation-seeds must be >= 0 (got {optim.validation_seeds})")
        _check(render.roots >= 1 and not render.roots & (render.roots - 1), f"--roots must be a power of two (got {render.roots})")
        _check(bool(search.init_word.replace(",", "").strip()), "--init-word must name a word, words or auto")
        _check(score.flip_weight >= 0 and score.clip_weight >= 0, "loss weights must be >= 0")
        _check(score.flip_weight + score.clip_weight > 0, "at least one of --flip-weight / --clip-weight must be > 0")
        _check(score.weighting in WEIGHTINGS, f"--weighting must be one of {', '.join(WEIGHTINGS)}")
        _check(score.ppd > 0, "--ppd must be > 0")
        _check(self.model.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}")
        _check(prompt.clip_skip >= 0, "--clip-skip must be >= 0")
        _check(bool(prompt.prompt.strip()) or bool(prompt.guide), "give a --prompt, a --guide image, or both")
        _check(prompt.concepts is None or bool(prompt.guide), "--concepts needs a --guide image to take concepts from")
        _check("strength" not in search.blocks or prompt.init_image, "the 'strength' block needs --init-image")
        guides = bool(prompt.guide) or (prompt.guide_target and bool(score.targets))
        _check(not (GUIDED_BLOCKS & set(search.blocks)) or guides,
               "the guidance blocks need a --guide image (or --target with --guide-target)")
        _check(not score.targets or score.flip_weight > 0 or score.clip_weight > 0, "targets need a loss weight")
        self._check_masks()
        self._absolute_paths()
        self._check_files()
        return self

    def _check_masks(self) -> None:
        """--mask: with targets, one for all of them or one per target (counted here when every
        target is a file; the loader counts a folder's images again)."""
        masks, targets = self.score.masks, self.score.targets
        _check(not masks or bool(targets), "--mask needs --target: a mask selects the part of a target image to pin")
        countable = all(Path(t).is_file() for t in targets)
        _check(not countable or len(masks) in (0, 1, len(targets)),
               f"give one --mask for all targets or one per target, in target order (got {len(masks)} masks for "
               f"{len(targets)} targets)")

    def _absolute_paths(self) -> None:
        """Every input path that exists, made absolute (not resolved through links): the run's
        config.toml then names the same files whatever folder ``--resume``, ``analyze`` or
        ``render`` later run from. Paths that do not exist stay as typed, for the error message."""
        def absolute(path):
            return os.path.abspath(path) if path and path != "micro" and Path(path).exists() else path
        model, prompt, search, score = self.model, self.prompt, self.search, self.score
        model.name, model.model_config = absolute(model.name), absolute(model.model_config)
        model.clip = [absolute(p) for p in model.clip]
        prompt.guide, prompt.init_image = [absolute(p) for p in prompt.guide], absolute(prompt.init_image)
        search.init_embedding = absolute(search.init_embedding)
        score.targets, score.masks = [absolute(p) for p in score.targets], [absolute(p) for p in score.masks]

    def _check_files(self) -> None:
        """Input files exist, checked before torch is imported (the loaders check again, with
        the same messages, for library callers that skip the config)."""
        for t in self.score.targets:
            if not Path(t).exists():
                raise InputError(f"target not found: {t}")
        for m in self.score.masks:
            if not Path(m).is_file():
                raise InputError(f"mask not found: {m}")
        for image in [*self.prompt.guide, *([self.prompt.init_image] if self.prompt.init_image else [])]:
            if not Path(image).is_file():
                raise InputError(f"image not found: {image}")
        if self.search.init_embedding and not Path(self.search.init_embedding).is_file():
            raise InputError(f"embedding not found: {self.search.init_embedding}")

    def for_model(self, profile: str, height: int, width: int, max_batch: int) -> RunConfig:
        """A copy with every model-dependent default filled in (``profile``'s steps, CFG and
        sampler; the render size; the UNet batch): what the run writes as its config.toml."""
        d, r = MODEL_DEFAULTS[profile], self.render
        render = dataclasses.replace(r, steps=r.steps or d.steps, cfg=d.cfg if r.cfg is None else r.cfg,
                                     scheduler=r.scheduler or d.scheduler, size=None, height=height, width=width,
                                     max_batch=max_batch)
        return dataclasses.replace(self, render=render)

    def inverts(self) -> bool:
        """Whether the run fits its token vectors by gradient before the search (``--inversion-steps``):
        token vectors searched, target images to fit them to."""
        search = self.search
        return search.inversion_steps > 0 and "token_vectors" in search.blocks and bool(self.score.targets)

    def uses_guide(self) -> bool:
        """Whether a searched block reads guide images (image guidance, concepts, the image delta basis)."""
        blocks = set(self.search.blocks)
        return bool(blocks & (GUIDED_BLOCKS | {"guidance"})) or ("delta" in blocks and self.search.basis == "image")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _build(cls, d, "")

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
            raise ConfigError(f"{path}: not a valid TOML config: {e}") from None
        return cls.from_dict(data)


def _check(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section [{where or 'root'}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) in [{where or 'root'}]: {', '.join(sorted(unknown))}")
    kw = {}
    for k, v in d.items():
        sub = _SECTIONS.get((cls, k))
        kw[k] = _build(sub, v, k) if sub else _typed(fields[k], v, where)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"bad config section [{where or 'root'}]: {e}") from None


_SECTIONS = {(RunConfig, "model"): ModelConfig, (RunConfig, "prompt"): PromptConfig,
             (RunConfig, "search"): SearchConfig, (RunConfig, "render"): RenderConfig,
             (RunConfig, "score"): ScoreConfig, (RunConfig, "optim"): OptimConfig}


def _typed(f: dataclasses.Field, v, where: str):
    """Check a TOML value against the field's declared type (as written in the annotation)."""
    t = str(f.type)
    ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
          "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str),
          "list[str]": lambda x: isinstance(x, list) and all(isinstance(i, str) for i in x)}
    base = t.replace(" | None", "")
    if v is None and "None" in t:
        return v
    if base == "list[str]" and isinstance(v, str):  # one value where a list is expected (older configs)
        v = [v]
    if base in ok and not ok[base](v):
        raise ConfigError(f"config key {f.name} in [{where or 'root'}] must be {base} (got {v!r})")
    return float(v) if base == "float" else v


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def dumps_toml(d: dict) -> str:
    """A minimal TOML writer for our config tree (None values are left out = defaults)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    out = top + [""]
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            out += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
            out.append("")
    return "\n".join(out)
