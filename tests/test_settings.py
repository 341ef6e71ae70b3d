"""Each setting is declared once (embedpin.config): its flag, its API keyword, its help text and
its checks come from that declaration, and the library's own defaults agree with it."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from embedpin.api import run_config, scale_config
from embedpin.cli import _given, build_parser, main
from embedpin.config import (
    BLOCKS,
    FLAGGED,
    GUIDED_BLOCKS,
    MICRO,
    SCALE,
    SCHEDULERS,
    SETTINGS,
    OptimConfig,
    PromptConfig,
    RenderConfig,
    RunConfig,
    ScaleConfig,
    ScoreConfig,
    SearchConfig,
)
from embedpin.errors import ConfigError

STAR = str(Path(__file__).resolve().parents[1] / "examples" / "star.png")
SECTIONS = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}


def _fields():
    """(class, field) of every setting field of the config tree (not RunConfig's sections)."""
    for cls in (*(f.default_factory for f in dataclasses.fields(RunConfig) if f.name in SECTIONS), RunConfig,
                ScaleConfig):
        yield from ((cls, f) for f in dataclasses.fields(cls) if cls is not RunConfig or f.name not in SECTIONS)


def test_every_field_is_declared_with_a_flag_or_as_config_only():
    config_only = set()
    for cls, f in _fields():
        assert "setting" in f.metadata, f"{cls.__name__}.{f.name} is not declared with config.setting()"
        if f.metadata["setting"].flag is None:
            config_only.add(f.name)
    assert config_only == {"weighting_scale", "tol_fun", "tol_x"}
    assert len(SETTINGS) == len(list(_fields()))
    with pytest.raises(ConfigError, match="unknown setting 'weighting_scale'"):  # no flag, no keyword
        run_config(prompt="x", weighting_scale=2.0)


def test_help_lists_each_flag_once(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    text = capsys.readouterr().out
    listed = [m.group(1) for m in re.finditer(r"^  (--[\w-]+)", text, re.MULTILINE)]
    flags = [s.flag for s in FLAGGED] + ["--config", "--resume", "--json", "--quiet"]
    assert sorted(listed) == sorted(flags)
    text = " ".join(text.split())
    assert "(default: 16)" in text and "(default, by model: micro 12, SD 1.x 20" in text  # defaults shown
    assert "(default: 67.02)" in text and "(default: 600)" in text


def _examples(s):
    """Values to try for a setting, as API keyword values (the first that validates is used)."""
    if s.kind == "switch":
        return [False]
    if s.kind == "off":
        return [True]
    if s.kind == "csv":
        return [["token_vectors", "cfg"]]
    base = s.type.replace(" | None", "")
    if base == "int":
        return [16, 4, 2, 1]
    if base == "float":
        return [0.5, 2.0]
    return [*(s.choices or ())[::-1], STAR, "float16", "red"]


def _argv(s, value):
    if s.kind == "switch":
        return [s.flag if value else "--no-" + s.flag[2:]]
    if s.kind == "off":
        return [s.flag] if value else []
    return [s.flag, ",".join(value) if isinstance(value, list) else str(value)]


@pytest.mark.parametrize("s", FLAGGED, ids=lambda s: s.flag)
def test_a_flag_and_its_keyword_give_the_same_config(s):
    base = {k: v for k, v in dict(prompt="a star", target=STAR, guide=STAR).items() if k != s.key}
    build = scale_config if s.section == SCALE else run_config
    for value in _examples(s):
        try:
            api = build(**base, **{s.key: value})
        except ConfigError:
            continue
        if s.get(api) != s.get(build(**base)):
            break
    else:
        pytest.fail(f"no example value of {s.flag} validates and changes the config")
    argv = ["optimize", *(w for k, v in base.items() for w in (f"--{k}", v)), *_argv(s, value)]
    a = build_parser().parse_args(argv)
    cli = ScaleConfig.from_settings(_given(a)) if s.section == SCALE else RunConfig.from_settings(_given(a))
    assert api == cli
    by_field = (not value) if s.kind == "off" else value  # the field's name works too (hyperbatch=False)
    assert build(**base, **{s.name: by_field}) == api


def _defaults(fn, *names):
    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names}


def test_library_defaults_agree_with_the_config():
    """Library functions called without a config default to the run's defaults."""
    from embedpin.evaluation.inversion import InversionSettings
    from embedpin.evaluation.seeds import search_seed
    from embedpin.guidance.context import GuidanceOptions
    from embedpin.guidance.encode import encode_negative, encode_prompt
    from embedpin.render.sampler import RenderPlan
    from embedpin.render.schedule import branch_schedule
    from embedpin.scoring.flip import DEFAULT_PPD, flip_cross_masked, flip_features, pairwise_flip
    from embedpin.scoring.scorer import Scorer

    score, search, render, optim, prompt = ScoreConfig(), SearchConfig(), RenderConfig(), OptimConfig(), PromptConfig()
    assert _defaults(Scorer, "flip_weight", "clip_weight", "std_weight", "hyperbatch_weighting", "hyperbatch_scale",
                     "ppd") == dict(flip_weight=score.flip_weight, clip_weight=score.clip_weight,
                                    std_weight=score.std_weight, hyperbatch_weighting=score.weighting,
                                    hyperbatch_scale=score.weighting_scale, ppd=score.ppd)
    assert DEFAULT_PPD == score.ppd
    assert {fn.__name__: _defaults(fn, "ppd")["ppd"] for fn in (flip_features, pairwise_flip, flip_cross_masked)} == \
        dict.fromkeys(("flip_features", "pairwise_flip", "flip_cross_masked"), score.ppd)
    plan = RenderPlan()
    assert (plan.batch, plan.seed, plan.hyperbatch, plan.renoise, plan.roots) == \
        (render.batch, optim.seed, render.hyperbatch, render.renoise, render.roots)
    assert (plan.steps, plan.scheduler) == (MICRO.steps, MICRO.scheduler)  # model-dependent: the built-in model's
    assert _defaults(branch_schedule, "roots") == dict(roots=render.roots)
    o = GuidanceOptions()
    assert (o.delta_k, o.vector_k, o.vector_basis, o.seed, o.cfg, o.strength, o.clip_skip) == \
        (search.rank, search.rank, search.basis, optim.seed, MICRO.cfg, render.strength, prompt.clip_skip)
    assert _defaults(encode_prompt, "clip_skip") == _defaults(encode_negative, "clip_skip") == \
        dict(clip_skip=prompt.clip_skip)
    inv = InversionSettings()
    assert (inv.steps, inv.batch, inv.lr, inv.seed) == \
        (search.inversion_steps, search.inversion_batch, search.inversion_lr, optim.seed)
    assert _defaults(search_seed, "schedule") == dict(schedule=optim.search_seeds)


def test_each_name_list_is_the_config_s():
    """The stages' tables are keyed by the config's names (the stage owns what a name means)."""
    from embedpin.guidance.blocks import BLOCK_NAMES
    from embedpin.guidance.flex import FLEX_PARAMS
    from embedpin.models.schedulers import SCHEDULER_CLASSES
    from embedpin.render.solvers import make_sampler

    assert {"guidance", *BLOCK_NAMES} == set(BLOCKS) and len(BLOCKS) == len(BLOCK_NAMES) + 1
    assert GUIDED_BLOCKS == {*FLEX_PARAMS, "concept"}
    assert set(SCHEDULER_CLASSES) == set(SCHEDULERS)
    for name in SCHEDULERS:
        make_sampler(name)


@pytest.mark.parametrize("settings, message", [
    (dict(roots=3), "--roots must be a power of two (got 3)"),
    (dict(max_batch="1"), "--max-batch must be >= 2 or auto (got 1)"),
    (dict(max_batch="lots"), "argument --max-batch: not a number or auto: 'lots'"),
    (dict(vectors=0), "--vectors must be >= 1 (got 0)"),
    (dict(basis="nope"), "argument --basis: invalid choice: 'nope'"),
    (dict(dtype="int8"), "--dtype must be one of float32, float16, bfloat16"),
    (dict(size=64, width=64), "not both"),
    (dict(blocks="warp"), "unknown search block"),
    (dict(init_word=","), "--init-word must name a word, words or auto"),
])
def test_keywords_get_the_cli_messages(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(prompt="x", **settings)
    argv = [w for k, v in settings.items() for w in ("--" + k.replace("_", "-"), str(v))]
    with pytest.raises(ConfigError, match=re.escape(message)):
        a = build_parser().parse_args(["optimize", "--prompt", "x", *argv])
        RunConfig.from_settings(_given(a))


def test_max_batch_auto_and_the_toml_then_the_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[render]\nbatch = 4\nroots = 4\n[prompt]\nprompt = "from the file"\n')
    c = run_config(config=str(toml), roots=1, max_batch="auto")
    assert (c.render.batch, c.render.roots, c.render.max_batch, c.prompt.prompt) == (4, 1, None, "from the file")
    with pytest.raises(ConfigError, match="unknown setting 'resume'"):
        run_config(prompt="x", resume="runs/x")


@pytest.mark.parametrize("settings, chooses, points", [
    (dict(), True, 4),                       # the default: 4 points of the fit and the init words validated
    (dict(inversion_starts=1), True, 1),     # the fit's end against the init words
    (dict(inversion_starts=0), False, 1),    # the fit's end, unvalidated
    (dict(validation_seeds=0), False, 1),    # nothing to choose on
    (dict(inversion_steps=0), False, 1),     # no fit: nothing to choose from
    (dict(blocks="guidance"), False, 1),     # no token vectors
])
def test_the_start_is_chosen_only_with_an_inversion_and_validation_seeds(settings, chooses, points):
    c = run_config(prompt="a star", target=STAR, **settings)
    assert (c.chooses_start(), c.inversion_points()) == (chooses, points)
