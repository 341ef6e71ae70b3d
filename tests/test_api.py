"""The Python API: the same inputs through ``embedpin.optimize`` and through the CLI give the
same config.toml and the same results; the light entry points never import torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import embedpin
from embedpin.cli import _given, build_parser, main
from embedpin.config import RunConfig
from embedpin.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STAR = str(ROOT / "examples" / "star.png")
TINY = dict(inversion_steps=2, generations=1, population=4, batch=2, steps=4, validation_seeds=2)


def _cli_config(argv):
    a = build_parser().parse_args(argv)
    return RunConfig.from_settings(_given(a), a.config)


def test_keywords_are_the_cli_flags():
    api = embedpin.run_config(target=[STAR, STAR], prompt="a star", blocks=["token_vectors", "cfg"], cfg=6.5,
                          guide_target=False, no_hyperbatch=True, init_word="red,left", seed=3)
    cli = _cli_config(["optimize", "--target", STAR, "--target", STAR, "--prompt", "a star", "--blocks",
                       "token_vectors,cfg", "--cfg", "6.5", "--no-guide-target", "--no-hyperbatch",
                       "--init-word", "red,left", "--seed", "3"])
    assert api.to_toml() == cli.to_toml()
    assert api.render.hyperbatch is False and api.prompt.guide_target is False and api.render.cfg == 6.5
    assert embedpin.run_config(prompt="x").to_toml() == _cli_config(["optimize", "--prompt", "x"]).to_toml()


@pytest.mark.parametrize("settings, message", [
    (dict(stepz=4), "unknown setting 'stepz'"),
    (dict(steps="many"), "invalid int value"),
    (dict(roots=3), "power of two"),
    (dict(resume="runs/x"), "unknown setting 'resume'"),
])
def test_bad_settings_raise_the_cli_message(settings, message):
    with pytest.raises(ConfigError, match=message):
        embedpin.run_config(prompt="a star", **settings)


def test_optimize_through_the_api_equals_the_cli(tmp_path):
    res = embedpin.optimize(target=STAR, prompt="a star", out=str(tmp_path), **TINY)
    argv = ["optimize", "--target", STAR, "--prompt", "a star", "--out", str(tmp_path), "--quiet"]
    argv += [w for k, v in TINY.items() for w in ("--" + k.replace("_", "-"), str(v))]
    assert main(argv) == 0
    api_dir, cli_dir = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert res.run_dir == api_dir
    assert (api_dir / "config.toml").read_text() == (cli_dir / "config.toml").read_text()
    api_state, cli_state = (json.loads((d / "state.json").read_text()) for d in (api_dir, cli_dir))
    same = ("best", "median", "worst", "validation", "renders")  # (not the timings)
    assert [[h[k] for k in same] for h in api_state["history"]] == [[h[k] for k in same] for h in cli_state["history"]]
    assert api_state["best"] == cli_state["best"]
    tensors, recipe = embedpin.load_pinned(cli_dir)
    assert torch.equal(res.pinned["prompt_embeds"], tensors["prompt_embeds"])
    assert res.validation_loss == res.best_loss <= res.plain_validation_loss  # the plain prompt is the floor
    assert recipe["prompt"] == "a star"
    out = embedpin.export(api_dir, format="diffusers", output=tmp_path / "pinned_embeds.safetensors")
    assert torch.equal(embedpin.load_pinned(out)[0]["prompt_embeds"], tensors["prompt_embeds"])
    again = embedpin.resume(api_dir)  # a finished run resumes to the same result
    assert again.best_loss == res.best_loss and torch.equal(again.pinned["prompt_embeds"], res.pinned["prompt_embeds"])


@pytest.mark.parametrize("code", [
    "import embedpin",
    "from embedpin.cli import main; main(['--help'])",
    "from embedpin.cli import main; main(['optimize', '--help'])",
    "from embedpin.cli import main; assert main(['optimize', '--prompt', 'x', '--roots', '3']) == 2",
    "from embedpin.cli import main; assert main(['optimize', '--steps', 'x']) == 2",
])
def test_help_and_argument_errors_do_not_import_torch(code):
    check = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


def test_the_core_never_imports_ray():
    """Ray is an optional extra: the run loop, the CLI and the API load without it (only
    ``evaluation.ray_workers`` imports it, for --workers / --ray-address)."""
    check = ("import sys\nimport embedpin.api, embedpin.cli, embedpin.runner\n"
             "from embedpin.cli import main\nassert main(['optimize', '--workers', '-1']) == 2\n"
             "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


def test_no_module_of_the_package_hides_an_api_function():
    """``embedpin.export(...)`` stays the function after ``embedpin.exports`` is imported: a module
    named like an API function would replace the package's attribute once anything imports it."""
    import pkgutil

    import embedpin

    modules = {m.name for m in pkgutil.iter_modules(embedpin.__path__)}
    assert not modules & set(embedpin.__all__)
