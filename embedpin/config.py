"""One typed config tree for a pinning run: dataclasses, validated at the boundary,
written beside the run as ``config.toml`` (everything needed to reproduce it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
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
VECTOR_BASES = ("pca", "random")  # the token vectors' bases (BASES but the guide image's)
WEIGHTINGS = ("none", "geometric", "exponential", "polynomial")
SEED_SCHEDULES = ("rotate", "fixed")
DTYPES = ("float32", "float16", "bfloat16")
KEEP_IMAGES = ("best", "all")
PLACEMENTS = ("before", "after")
# The samplers a user can choose (--scheduler); embedpin.models.schedulers maps each to its diffusers class.
SCHEDULERS = ("euler", "euler-a", "ddim", "ddpm", "dpm++2m", "dpm++2m-karras", "dpm++sde", "dpm++sde-karras", "unipc",
              "heun", "lms", "pndm")
# ꟻLIP's viewing condition (Andersson et al. 2020, sec. 5): a 0.7 m wide 3840-pixel monitor seen from 0.7 m,
# in pixels per degree of visual angle (67.02): the run's default and the library's.
FLIP_PPD = 0.7 * (3840 / 0.7) * math.pi / 180
PLACEHOLDER = "<pinned>"  # the placeholder token an exported textual inversion is used by, by default
CPU_MAX_BATCH = 256  # images per UNet call without a GPU to probe (host memory): the largest batch a run uses anyway
# The image-guidance blocks (FlexDiffuse's parameters, embedpin.guidance.flex) and the concept weight: they need guide images.
FLEX_BLOCKS = ("linear_start", "linear_end", "clustered", "threshold", "threshold_floor", "max_image", "header_cap")
POLISH_GENERATIONS = 8  # generations after a gradient stage has found the start: the search polishes it

# The optimize command's help groups, in order: name -> title.
GROUPS = {
    "inputs": "inputs", "model": "model", "search": "search space", "optimizer": "optimizer",
    "rendering": "rendering", "loss": "loss",
    "scale": "scale-out (Ray; pip install 'embedpin[ray]'; the result does not depend on these, so they are not "
             "part of the run's config.toml and work with --resume)",
    "run": "run",
}
SCALE = "scale"  # the section of ScaleConfig's settings (not part of a RunConfig)


@dataclass(frozen=True, eq=False)  # (hashed by identity: given settings are dict keys)
class Setting:
    """One setting's declaration, the metadata of its config field: everything the CLI flag,
    ``--help``, the API keyword and :meth:`RunConfig.validate` need. ``kind``: ``value`` (one
    value), ``append`` (a repeatable flag, a list), ``csv`` (a comma-separated list),
    ``switch`` (``--x / --no-x``) or ``off`` (``--no-x`` sets the field False). ``check``:
    (predicate, message after the flag name, ``{value}`` filled in), tried on every value but
    None. ``by_model``: the default is the model family's (:data:`MODEL_DEFAULTS`)."""

    help: str
    group: str
    flag: str | None = ""        # "": --<field name with dashes>; None: config-only (no flag, no keyword)
    kind: str = "value"
    parse: Callable[[str], Any] | None = None  # text -> value; None: the field's type
    choices: tuple[str, ...] | None = None
    check: tuple[Callable[[Any], bool], str] | None = None
    metavar: str | None = None
    by_model: bool = False
    shown: str = ""              # format spec of the default in --help
    # filled in from the field (see SETTINGS):
    name: str = ""
    section: str = ""            # RunConfig's section ("" for RunConfig's own fields), or SCALE
    type: str = ""
    default: Any = None

    @property
    def key(self) -> str:
        """The API keyword: the long flag with underscores (``validation_seeds``, ``no_hyperbatch``)."""
        return self.flag[2:].replace("-", "_")

    @property
    def label(self) -> str:
        """How messages name the setting: its flag, else its config key."""
        return self.flag or self.name

    def help_text(self) -> str:
        """The help text with its default (``{default}``) or the families' defaults (``{by_model}``)."""
        value = self.default
        shown = ",".join(value) if isinstance(value, list) else format(value, self.shown)
        by = by_model(self.name) if self.by_model else ""
        return self.help.replace("{default}", shown).replace("{by_model}", by)

    def convert(self, text: str) -> Any:
        """One command-line word -> the value (None: not given); ValueError with argparse's wording."""
        if self.kind == "csv":
            return [b.strip() for b in text.split(",") if b.strip()] or None
        base = self.type.replace(" | None", "").replace("list[str]", "str")
        parse = self.parse or {"int": int, "float": float}.get(base, str)
        try:
            value = parse(text)
        except ValueError:
            if self.parse:
                raise
            raise ValueError(f"invalid {base} value: {text!r}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(map(repr, self.choices))})")
        return value

    def from_keyword(self, value: Any) -> Any:
        """An API keyword's value -> the value the flag gives (None: not given): the command-line
        words it stands for, converted as the CLI converts them."""
        if value is None:
            return None
        if self.kind in ("switch", "off"):
            return bool(value) if self.kind == "switch" else (True if value else None)
        if self.kind == "append":
            values = value if isinstance(value, (list, tuple)) else [value]
            return [self.convert(str(v)) for v in values] or None
        if self.kind == "csv" and isinstance(value, (list, tuple)):
            value = ",".join(value)
        return self.convert(str(value))

    def field_value(self, given: Any) -> Any:
        """What a given flag value sets the field to (``--no-hyperbatch``: hyperbatch False)."""
        return False if self.kind == "off" and given else given

    def _owner(self, config):
        """The dataclass that holds this field: ``config``'s section, or ``config`` itself."""
        return getattr(config, self.section) if self.section not in ("", SCALE) else config

    def get(self, config) -> Any:
        return getattr(self._owner(config), self.name)

    def put(self, config, value) -> None:
        setattr(self._owner(config), self.name, value)

    def validate(self, value) -> None:
        """This setting's own rules (choices, range) on a value; ConfigError with one line."""
        if value is None or self.kind == "csv":
            return
        if self.choices:
            _check(value in self.choices, f"{self.label} must be one of {', '.join(self.choices)} (got {value!r})")
        if self.check:
            ok, message = self.check
            _check(ok(value), f"{self.label} {message.format(value=value)}")


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **declared) -> Any:
    """A config field and its :class:`Setting` (``declared``: the Setting's fields)."""
    meta = {"setting": Setting(**declared)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be >= {low} (got {{value}})"


def above(low) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"must be > {low} (got {{value}})"


def max_batch_text(text: str) -> int | None:
    """``--max-batch``: a number, or ``auto`` (None: probed on a GPU)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a number or auto: {text!r}") from None


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


@dataclass
class ModelConfig:
    name: str = setting("micro", group="model", flag="--model",
                        help="micro (built in) | diffusers folder | hub id (cached, else downloaded) | .safetensors "
                             "checkpoint (default: {default})")
    clip: list[str] = setting(
        factory=list, group="model", kind="append", metavar="FOLDER_OR_ID",
        help="image CLIP model folder or hub id (real models; repeatable: SDXL takes one tower per text encoder, e.g. "
             "ViT-L/14 and ViT-bigG/14; the first also serves the CLIP loss)")
    model_config: str | None = setting(
        None, group="model",
        help="single-file checkpoints: which configs to load them with, a shipped one (sd15, sd21, sd21-base, "
             "sdxl-base) or a diffusers folder / hub id (default: the shipped config the file's shapes fit)")
    device: str = setting("auto", group="model", help="auto | cpu | cuda | cuda:N | mps (default: {default})")
    dtype: str = setting("float32", group="model", check=((lambda v: v in DTYPES), f"must be one of {', '.join(DTYPES)}"),
                         help=f"{' | '.join(DTYPES)} (default: {{default}})")


@dataclass
class PromptConfig:
    prompt: str = setting("", group="inputs", help="the prompt to pin")
    negative: str = setting("", group="inputs", help="negative prompt")
    guide: list[str] = setting(factory=list, group="inputs", kind="append", metavar="IMAGE",
                               help="guide image for CLIP image guidance (FlexDiffuse mapping onto the prompt)")
    concepts: str | None = setting(None, group="inputs",
                                   help="second prompt selecting which guide-image features map in")
    init_image: str | None = setting(None, group="inputs", help="img2img init image")
    clip_skip: int = setting(0, group="model", check=((lambda v: v >= 0), "must be >= 0"),
                             help="skip last text-encoder layers (default: {default})")
    guide_target: bool = setting(True, group="inputs", kind="switch",
                                 help="without --guide: the target image(s) are the guide images of image guidance "
                                      "and the delta's image basis (default: {default})")


@dataclass
class SearchConfig:
    blocks: list[str] = setting(factory=lambda: ["token_vectors"], group="search", kind="csv",
                                help=f"comma-separated search blocks from {{{','.join(BLOCKS)}}} (default: {{default}})")
    basis: str = setting("pca", group="search", choices=BASES,
                         help="basis of the conditioning delta and of the token vectors (these take pca or random; "
                              "default: {default})")
    rank: int = setting(16, group="search", check=at_least(1), help="basis size K (default: {default})")
    n_vectors: int = setting(4, group="search", flag="--vectors", check=at_least(1),
                             help="textual-inversion tokens (default: {default})")
    init_word: str = setting("auto", group="search", check=((lambda v: bool(v.replace(",", "").strip())),
                                                            "must name a word, words or auto"),
                             help="token vectors start here: a word, comma-separated words (one per vector), or auto "
                                  "(the words CLIP ranks highest for the target; default: {default})")
    init_embedding: str | None = setting(
        None, group="search", metavar="FILE.safetensors",
        help="start the token vectors at an existing textual-inversion embedding (A1111 / ComfyUI / kohya / embedpin "
             ".safetensors of this model's family; its rows set the number of vectors, and they are used even when "
             "token_vectors is not searched)")
    placement: str = setting("before", group="search", choices=PLACEMENTS,
                             help="where the token vectors stand in the prompt you will use: after its words "
                                  f"(\"<prompt> {PLACEHOLDER}\") or before them (\"{PLACEHOLDER} <prompt>\": the text encoder is "
                                  "causal, so only there can they change the words' states; default: {{default}})")
    inversion_steps: int = setting(300, group="search", metavar="N", check=at_least(0),
                                   help="before the search, fit the token vectors to the targets by gradient descent "
                                        "on the model's own denoising loss (textual inversion, in the prompt as you "
                                        "will use it) for N steps; the search then starts there. 0: off, "
                                        "gradient-free only (default: {default})")
    inversion_batch: int = setting(16, group="search", metavar="N", check=at_least(1),
                                   help="noised target samples per inversion step (default: {default})")
    inversion_lr: float = setting(1.0, group="search", check=above(0),
                                  help="inversion step size, in typical token-embedding coordinates (default: "
                                       "{default})")
    inversion_starts: int = setting(4, group="search", metavar="N", check=at_least(0),
                                    help="where the search starts: the init words and N evenly spaced points of the "
                                         "inversion (its end included), rendered on the validation seeds, the best "
                                         "taken; 0 (or --validation-seeds 0): the inversion's end (default: "
                                         "{default})")


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
    batch: int = setting(8, group="rendering", check=at_least(1), help="images per candidate B (default: {default})")
    steps: int | None = setting(None, group="rendering", by_model=True, check=at_least(1),
                                help="sampling steps (default, by model: {by_model})")
    scheduler: str | None = setting(None, group="rendering", by_model=True, choices=tuple(sorted(SCHEDULERS)),
                                    help="sampler (default, by model: {by_model})")
    size: int | None = setting(None, group="rendering", check=at_least(8),
                               help="square images: --width and --height both this")
    width: int | None = setting(None, group="rendering", check=at_least(8),
                                help="image width in pixels, a multiple of the model's VAE x UNet factor (SD: 64); "
                                     "default: the first target's aspect ratio at the model's native area (micro 64², "
                                     "SD 1.x 512², SD 2.x 768², SDXL 1024²); with only --width or --height, the other "
                                     "follows that ratio")
    height: int | None = setting(None, group="rendering", check=at_least(8),
                                 help="image height in pixels (see --width)")
    cfg: float | None = setting(None, group="rendering", by_model=True, check=at_least(0),
                                help="classifier-free guidance scale (default, by model: {by_model})")
    hyperbatch: bool = setting(True, group="rendering", flag="--no-hyperbatch", kind="off",
                               help="plain batches instead of hyperbatches")
    max_batch: int | None = setting(None, group="rendering", parse=max_batch_text, metavar="N|auto",
                                    check=((lambda v: v >= 2), "must be >= 2 or auto (got {value})"),
                                    help="most images per UNet call, CFG halves included; auto: on a GPU the most its "
                                         "free memory holds (measured by a probe; halved if a call still runs out of "
                                         f"memory), elsewhere {CPU_MAX_BATCH} (default: auto)")
    strength: float = setting(0.6, group="rendering", check=((lambda v: 0.0 <= v <= 1.0), "must be in [0, 1] (got "
                                                                                            "{value})"),
                              help="img2img strength (default: {default})")
    renoise: float | None = setting(None, group="rendering", check=at_least(0),
                                    help="hyperbatch branch re-noise: eta of the ancestral step a copy takes at branches "
                                         "after step 0, whose copy is a second root (default: 1 for deterministic "
                                         "samplers, the DDPM posterior's amount; 0 for stochastic ones, whose copies "
                                         "draw their own step noise; higher: more diverse siblings, from about 2 all "
                                         "noise is replaced and colours wash out)")
    roots: int = setting(2, group="rendering", check=(_power_of_two, "must be a power of two (got {value})"),
                         help="independent initial latents per candidate in a hyperbatch, a power of two; the rest of "
                              "the batch branches from them (default: {default})")


@dataclass
class ScoreConfig:
    targets: list[str] = setting(factory=list, group="inputs", flag="--target", kind="append", metavar="PATH",
                                 help="target image file or folder (repeatable); omitted: self mode, pin to lower "
                                      "variation across seeds")
    masks: list[str] = setting(factory=list, group="inputs", flag="--mask", kind="append", metavar="MASK",
                               help="which part of the target to pin: white = pin, black = ignore, grey = a weight "
                                    "between; once for all targets or once per target, in target order (repeatable; "
                                    "resized with its target; default: none, the whole image counts)")
    text_target: str | None = setting(None, group="inputs", help="target text for a CLIP text loss")
    flip_weight: float = setting(1.0, group="loss", help="weight of ꟻLIP (default: {default})")
    clip_weight: float = setting(0.0, group="loss", help="weight of CLIP (default: {default})")
    std_weight: float = setting(0.5, group="loss", check=at_least(0),
                                help="weight of the spread across seeds (a std, from independent image pairs; "
                                     "default: {default})")
    weighting: str = setting("none", group="loss", choices=WEIGHTINGS,
                             help="hyperbatch weighting over lineage depth (default: {default})")
    weighting_scale: float = setting(1.0, group="loss", flag=None, check=above(0),
                                     help="the hyperbatch weighting's scale (config.toml only)")
    ppd: float = setting(FLIP_PPD, group="loss", shown=".2f", check=((lambda v: v > 0), "must be > 0"),
                         help="ꟻLIP pixels per degree (default: {default})")


@dataclass
class OptimConfig:
    population: int | None = setting(None, group="optimizer", check=at_least(2),
                                     help="candidates per generation (default: 4 + 3 ln N)")
    generations: int | None = setting(None, group="optimizer", check=at_least(1),
                                      help=f"generations (default: {POLISH_GENERATIONS} after the inversion stage, "
                                           f"else 16 floor(ln N))")
    sigma0: float = setting(0.5, group="optimizer", check=above(0), help="initial step size (default: {default})")
    seed: int = setting(0, group="optimizer", help="seed for everything (default: {default})")
    max_distance: float | None = setting(None, group="optimizer", check=((lambda v: v > 0), "must be > 0"),
                                         help="multi-objective size limiter: best loss within this distance from the "
                                              "plain prompt")
    tol_fun: float = setting(1e-6, group="optimizer", flag=None,
                             help="CMA-ES stops when the last generation's losses and the recent best losses each "
                                  "span less than this (config.toml only)")
    tol_x: float = setting(1e-6, group="optimizer", flag=None,
                           help="CMA-ES stops when every coordinate of sigma p_c and sigma sqrt(diag C) is under this "
                                "(config.toml only)")
    search_seeds: str = setting("rotate", group="optimizer", choices=SEED_SCHEDULES,
                                help="rotate: new render seeds every generation; fixed: the same seeds every "
                                     "generation (default: {default})")
    validation_seeds: int = setting(16, group="optimizer", metavar="N", check=at_least(0),
                                    help="plain renders per validated candidate, on seeds the search never uses; the "
                                         "pinned result is the best on them; 0 turns validation off (default: "
                                         "{default})")


@dataclass
class ScaleConfig:
    """Where a run's candidates are rendered: in this process (``workers`` 0, no address) or on
    Ray workers (``embedpin.evaluation.ray_workers``). Not part of the recipe: a run renders the
    same on any number of workers, so these settings are given per invocation (``--workers``,
    ``--ray-address`` or ``RAY_ADDRESS``, also with ``--resume``) and never written to config.toml."""

    workers: int = setting(0, group="scale", metavar="N", check=at_least(0),
                           help="render on N Ray workers: a local Ray cluster with one worker per GPU (CPU workers "
                                "where there is no GPU); with --ray-address, N workers on that cluster (default: one "
                                "per GPU there). 0: in this process (default)")
    ray_address: str | None = setting(None, group="scale", metavar="ADDR",
                                      check=((lambda v: bool(v.strip())), "must not be empty"),
                                      help="join the Ray cluster at ADDR (started with `ray start --head`; default: "
                                           "$RAY_ADDRESS)")
    worker_timeout: float = setting(600.0, group="scale", metavar="SECONDS", shown="g", check=above(0),
                                    help="a worker whose chunk takes longer counts as hung: it is restarted and its "
                                         "candidates re-run elsewhere; a model load may take this, and at least 600 s, "
                                         "the inversion stage as much per 100 steps (default: {default})")
    worker_restarts: int = setting(3, group="scale", metavar="N", check=at_least(0),
                                   help="restarts of a dead or hung worker (each reloads the model) before it is "
                                        "given up (default: {default})")

    @property
    def distributed(self) -> bool:
        """Whether candidates render on Ray workers."""
        return self.workers > 0 or self.ray_address is not None

    @classmethod
    def from_settings(cls, given: dict[Setting, Any]) -> ScaleConfig:
        """The validated ScaleConfig of given settings (flags or keywords; others are ignored);
        no ``ray_address``: $RAY_ADDRESS."""
        scale = cls(ray_address=os.environ.get("RAY_ADDRESS") or None)
        for s, value in given.items():
            if s.section == SCALE and value is not None:
                s.put(scale, s.field_value(value))
        return scale.validate()

    def validate(self) -> ScaleConfig:
        """Each setting's declared rules."""
        for s in SETTINGS:
            if s.section == SCALE:
                s.validate(s.get(self))
        return self


# Blocks that need guide images ("guidance" stands for those the run's guide images allow).
GUIDED_BLOCKS = frozenset({*FLEX_BLOCKS, "concept"})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = setting("runs", group="run", help="folder for runs (default: {default})")
    keep_images: str = setting("best", group="run", choices=KEEP_IMAGES,
                               help="best: at 256² and up the run keeps compressed thumbnails of every image and "
                                    "full-size PNGs of each generation's best candidate (any image re-renders exactly "
                                    "with embedpin render); all: full-size PNGs of every image (default: {default})")

    @classmethod
    def from_settings(cls, given: dict[Setting, Any], toml: str | Path | None = None) -> RunConfig:
        """The validated RunConfig: the defaults, then the ``toml`` config file's, then the given
        settings (flags or API keywords; None: not given; ScaleConfig's are ignored)."""
        config = cls.from_toml(toml) if toml else cls()
        for s, value in given.items():
            if s.section != SCALE and value is not None:
                s.put(config, s.field_value(value))
        return config.validate()

    def validate(self) -> RunConfig:
        """Check every range a user can get wrong; raise ConfigError with one line: each
        setting's declared rules, then the rules between settings."""
        for s in SETTINGS:
            if s.section != SCALE:
                s.validate(s.get(self))
        render, search, score, prompt = self.render, self.search, self.score, self.prompt
        _check(render.size is None or (render.width is None and render.height is None),
               "give --size (a square) or --width / --height, not both")
        unknown = [b for b in search.blocks if b not in BLOCKS]
        _check(not unknown, f"unknown search block(s) {unknown}; choose from {', '.join(BLOCKS)}")
        _check(len(search.blocks) > 0, "at least one search block must be on")
        _check(score.flip_weight >= 0 and score.clip_weight >= 0, "loss weights must be >= 0")
        _check(score.flip_weight + score.clip_weight > 0, "at least one of --flip-weight / --clip-weight must be > 0")
        _check(bool(prompt.prompt.strip()) or bool(prompt.guide), "give a --prompt, a --guide image, or both")
        _check(prompt.concepts is None or bool(prompt.guide), "--concepts needs a --guide image to take concepts from")
        _check("strength" not in search.blocks or prompt.init_image, "the 'strength' block needs --init-image")
        guides = bool(prompt.guide) or (prompt.guide_target and bool(score.targets))
        _check(not (GUIDED_BLOCKS & set(search.blocks)) or guides,
               "the guidance blocks need a --guide image (or --target with --guide-target)")
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

    def chooses_start(self) -> bool:
        """Whether the search starts at the best of the init words and points of the inversion on the
        validation seeds (``--inversion-starts``), rather than at the inversion's end: an inversion,
        validation seeds and at least one point."""
        return self.inverts() and self.optim.validation_seeds > 0 and self.search.inversion_starts > 0

    def inversion_points(self) -> int:
        """How many points of the inversion are kept as starts (its end, the last, always)."""
        return self.search.inversion_starts if self.chooses_start() else 1

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


def _declared():
    """Each declared field's Setting, its field's name, section, type and default filled in."""
    sections = {**{k: c for (_, k), c in _SECTIONS.items()}, "": RunConfig, SCALE: ScaleConfig}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            if "setting" in f.metadata:
                s = f.metadata["setting"]
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                yield dataclasses.replace(s, name=f.name, section=section, type=str(f.type), default=default,
                                          flag=s.flag if s.flag != "" else "--" + f.name.replace("_", "-"))


SETTINGS: tuple[Setting, ...] = tuple(_declared())
FLAGGED = tuple(s for s in SETTINGS if s.flag)  # the settings with a flag (and an API keyword)
_KEYWORDS = {**{s.name: s for s in FLAGGED}, **{s.key: s for s in FLAGGED}}  # field names, and the flags' keywords


def settings_from_keywords(keywords: dict[str, Any]) -> dict[Setting, Any]:
    """API keywords (the long flags with underscores, or the field names) -> the given settings,
    each value converted as its flag's word would be (None: not given). ConfigError for an
    unknown keyword or a value the flag would not take, in the CLI's words."""
    given = {}
    for key, value in keywords.items():
        s = _KEYWORDS.get(key)
        if s is None:
            raise ConfigError(f"unknown setting {key!r}; the settings are embedpin optimize's long flags "
                              f"with underscores: {', '.join(sorted(['config', *(s.key for s in FLAGGED)]))}")
        try:
            off_field = key != s.key and s.kind == "off" and value is not None  # hyperbatch=False: --no-hyperbatch
            given[s] = s.from_keyword(not value if off_field else value)
        except ValueError as e:
            raise ConfigError(f"embedpin optimize: argument {s.flag}: {e}") from None
    return given


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
