"""Config validation / TOML round trip, the run store's atomic writes, CLI error handling."""

import ast
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embedpin
from embedpin.cli import main
from embedpin.config import RunConfig
from embedpin.errors import ConfigError, InputError
from embedpin.store import (
    CandidateRecord,
    GenerationRecord,
    HistoryEntry,
    PinnedRecord,
    RunState,
    RunStore,
    layout,
    write_json,
)


def _cfg(tmp_path, **render):
    c = RunConfig()
    c.prompt.prompt = "a small red circle"
    c.out = str(tmp_path / "runs")
    for k, v in render.items():
        setattr(c.render, k, v)
    return c


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(prompt=text, negative=text, batch=st.integers(1, 64), cfg=st.floats(0, 30, allow_nan=False),
       targets=st.lists(text, max_size=3), max_distance=st.none() | st.floats(0.01, 10))
def test_toml_round_trip(prompt, negative, batch, cfg, targets, max_distance):
    c = RunConfig()
    c.prompt.prompt, c.prompt.negative, c.render.batch, c.render.cfg = prompt, negative, batch, cfg
    c.score.targets, c.optim.max_distance = targets, max_distance
    import tomllib

    assert RunConfig.from_dict(tomllib.loads(c.to_toml())) == c


@pytest.mark.parametrize("field, value, words", [
    ("batch", 0, "--batch"), ("steps", 0, "--steps"), ("strength", 1.5, "--strength"), ("cfg", -1.0, "--cfg"),
])
def test_bad_ranges(tmp_path, field, value, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, **{field: value}).validate()


def test_prompt_or_guide_and_concepts_need_guide(tmp_path):
    c = _cfg(tmp_path)
    c.prompt.prompt = " "
    with pytest.raises(ConfigError, match="--prompt"):
        c.validate()
    c.prompt.prompt, c.prompt.concepts = "a tree", "creepy tree"
    with pytest.raises(ConfigError, match="--concepts needs a --guide"):
        c.validate()


def test_unknown_and_mistyped_config_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[render]\nbatchsize = 3\n')
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_toml(f)
    f.write_text('[render]\nbatch = "eight"\n')
    with pytest.raises(ConfigError, match="must be int"):
        RunConfig.from_toml(f)
    f.write_text('not = [toml')
    with pytest.raises(ConfigError, match="not a valid TOML"):
        RunConfig.from_toml(f)


def test_store_create_is_all_or_nothing(tmp_path):
    c = _cfg(tmp_path)
    s1 = RunStore.create(c)
    s2 = RunStore.create(c)
    assert s1.root.name.startswith("0001-a-small-red-circle") and s2.root.name.startswith("0002-")
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")] == []
    assert RunStore.open(s1.root).config() == c


def test_uncommitted_generation_is_dropped_on_open(tmp_path):
    s = RunStore.create(_cfg(tmp_path))
    tmp = s.begin_generation(0)
    (tmp / "images" / "x.png").write_bytes(b"partial")
    s.finish_generation(0, tmp, GenerationRecord(generation=0))  # folder in place, but state not updated
    s.begin_generation(1)                                # a half-assembled one
    RunStore.open(s.root)
    assert list((s.root / "generations").iterdir()) == []


def test_atomic_json_refuses_nan_and_leaves_no_temp(tmp_path):
    p = tmp_path / "state.json"
    write_json(p, {"a": 1})
    with pytest.raises(ValueError):
        write_json(p, {"a": float("nan")})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["state.json"]


def test_open_rejects_non_runs(tmp_path):
    with pytest.raises(InputError, match="not an embedpin run"):
        RunStore.open(tmp_path)


@pytest.mark.parametrize("argv, words", [
    (["optimize", "--batch", "x"], "invalid int value"),
    (["optimize", "--prompt", "a", "--batch", "0"], "--batch must be >= 1"),
    (["optimize", "--prompt", "a", "--scheduler", "nope"], "invalid choice"),
    (["optimize", "--prompt", "a", "--blocks", "warp"], "unknown search block"),
    (["optimize", "--prompt", "a", "--config", "/no/such.toml"], "no such config file"),
    (["optimize", "--resume", "/no/such/run"], "not an embedpin run folder"),
    (["export", "/no/such/run", "--format", "diffusers", "-o", "x.safetensors"], "no pinned result"),
    (["models", "--model", "weights.ckpt"], "pickle checkpoints are refused"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_user_mistakes_are_one_line_exit_2(tmp_path, capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_cli_help_lists_commands_and_knobs():
    r = subprocess.run([sys.executable, "-m", "embedpin", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in ("optimize", "render", "export", "report", "models"))
    r = subprocess.run([sys.executable, "-m", "embedpin", "optimize", "--help"], capture_output=True, text=True)
    for knob in ("--target", "--prompt", "--guide", "--concepts", "--init-image", "--population", "--generations",
                 "--sigma0", "--batch", "--steps", "--scheduler", "--size", "--cfg", "--seed", "--max-batch",
                 "--device", "--dtype", "--config", "--no-hyperbatch", "--resume", "--json", "--max-distance"):
        assert knob in r.stdout, knob


def test_records_round_trip_through_json_in_file_order():
    cand = CandidateRecord(index=None, loss=0.5, flip=0.4, params={"cfg": [5.0]}, image_losses=[0.5, None],
                           images=["validation/mean_i00.png"], lineage=[[0, 0]], seeds=[[1, 2]], kind="mean",
                           eligible=True)
    record = GenerationRecord(generation=3, sigma=0.2, best_candidate=0, seed=7,
                              candidates=[CandidateRecord(index=0, loss=0.6)], validation=[cand])
    data = json.loads(json.dumps(record.to_json()))
    assert list(data) == ["generation", "sigma", "best_candidate", "errmaps", "seed", "candidates", "validation"]
    assert "kind" not in data["candidates"][0] and data["validation"][0]["kind"] == "mean"
    assert GenerationRecord.from_json(data, "g") == record
    state = RunState(generation=1, best=PinnedRecord(generation=0, candidate=2, loss=0.3),
                     history=[HistoryEntry(generation=0, best=0.3, validation={"best": 0.4})])
    assert RunState.from_json(json.loads(json.dumps(state.to_json())), "s") == state
    assert list(PinnedRecord(generation=0, candidate=2, loss=0.3).to_json()) == [
        "generation", "candidate", "loss", "flip", "clip", "distance", "params"]


@pytest.mark.parametrize("data, message", [
    ({"candidates": []}, "missing 'generation'"),
    ({"generation": 0, "candidates": {"index": 0}}, "'candidates' must be a list"),
    ({"generation": 0, "candidates": [{"index": 0}]}, "missing 'loss'"),
    ({"generation": 0, "candidates": [3]}, "expected a JSON object"),
])
def test_malformed_records_are_input_errors(data, message):
    with pytest.raises(InputError, match=message):
        GenerationRecord.from_json(data, "record")


def test_a_state_with_an_unknown_status_or_version_is_refused(tmp_path):
    s = RunStore.create(_cfg(tmp_path))
    state = json.loads(s.state_path.read_text())
    for bad, message in ((dict(state, status="lost"), "unknown status"), (dict(state, version=99), "version")):
        s.state_path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message):
            s.read_state()


def _layout_spellings(tree: ast.AST):
    """The run-folder names (``store.layout``'s) a module's code spells: a string with a file
    name as one of its ``/`` parts, or one that starts with a folder name and ``/``, or a bare
    folder name joined to a path (``root / "targets"``) or compared; docstrings are prose."""
    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docs:
            continue
        parts, parent = node.value.split("/"), parents.get(id(node))
        yield from (p for p in parts if p in names and "." in p)
        joined = isinstance(parent, ast.Compare) or isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)
        if parts[0] in names and "." not in parts[0] and (len(parts) > 1 or joined):
            yield parts[0]


def test_only_the_layout_spells_the_run_folders_names():
    package = Path(embedpin.__file__).parent
    found = Counter()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        if not rel.startswith("embedpin/store/"):
            found.update((rel, name) for name in _layout_spellings(ast.parse(path.read_text(encoding="utf-8"))))
    assert not found, "spell run-folder names with embedpin.store.layout's constants and path functions"


def test_the_architecture_document_gives_the_layers_the_import_linter_checks():
    """docs/ARCHITECTURE.md's layer list is .importlinter's ``stages`` contract, row for row."""
    import configparser
    import re

    root = Path(embedpin.__file__).parents[1]
    contract = configparser.ConfigParser()
    contract.read(root / ".importlinter")
    checked = [row.strip() for row in contract["importlinter:contract:stages"]["layers"].splitlines() if row.strip()]
    doc = (root / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(embedpin\.api\n.*?)```", doc, re.S).group(1)
    assert block.split("\n")[:-1] == checked
