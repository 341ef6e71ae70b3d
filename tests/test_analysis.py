"""Token analysis (embedpin analyze): which prompt tokens lock the pinned result in."""

import json
import shutil

import numpy as np
import pytest
from support.micro_run import STAR, runs

from embedpin.cli import main
from embedpin.errors import InputError
from embedpin.guidance.tokens import token_label, tokenize
from embedpin.store import TokenAnalysis, load_run, read_analysis

# A prompt in the micro model's caption grammar with one word it never learnt to draw from:
# "picture" (an extra word of its captions) has no bearing on star.png, the shape word does.
PROMPT = "a picture of a yellow star on a blue striped background"
SETTINGS = ["--inversion-steps", "2", "--blocks", "token_weights", "--generations", "4", "--population", "6",
            "--batch", "4", "--steps", "6",
            "--validation-seeds", "4", "--quiet"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A token-weights run on star.png (its folder; the tests analyse it through the CLI)."""
    out = tmp_path_factory.mktemp("analysis")
    assert main(["optimize", "--target", STAR, "--prompt", PROMPT, "--out", str(out), *SETTINGS]) == 0
    (run,) = runs(out)
    return run


def test_token_labels_read_as_words():
    assert token_label("star</w>") == "star"
    assert token_label("sta") == "sta-"
    assert token_label("<v0>") == "<v0>"


@pytest.fixture(scope="module")
def micro():
    from embedpin.models.loader import load_components

    return load_components("micro")


def test_leaving_a_token_out_is_the_prompt_without_it(micro):
    without = tokenize(micro, "a (picture:1.3) of a star", omit=1)
    written = tokenize(micro, "a of a star")
    assert without.ids.tolist() == written.ids.tolist()
    assert without.weights.tolist() == [1.0] * 4
    with pytest.raises(ValueError):
        tokenize(micro, "a star", omit=2)


def test_spread_is_sigma_times_the_root_of_the_covariance_diagonal():
    from embedpin.optimizer.cmaes import CMAES

    opt = CMAES(np.zeros(3), 0.5, seed=1, lambda_=6)
    rng = np.random.default_rng(0)
    for _ in range(3):
        X = opt.ask()
        opt.tell(X, (X ** 2 * [1, 10, 100]).sum(1) + rng.normal(0, 1e-3, len(X)))
    state = opt.to_state()
    centre, std = opt.spread()
    assert np.array_equal(centre, state["mean"])
    assert np.allclose(std, state["sigma"] * np.sqrt(np.diag(state["C"])))


def test_analyze_names_the_tight_and_the_loose_tokens(analysed, capsys):
    capsys.readouterr()
    assert main(["analyze", str(analysed), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["token"]: r for r in data["rows"]}
    state = json.loads((analysed / "state.json").read_text())
    # the unchanged pinned result re-rendered in the analysis' batches is the run's validation figure
    assert data["loss"] == pytest.approx(state["best"]["loss"], abs=1e-5)
    assert [r["token"] for r in data["rows"]] == PROMPT.split()
    assert rows["star"]["verdict"] == "tight", rows["star"]
    assert rows["picture"]["verdict"] in ("loose", "irrelevant"), rows["picture"]
    for r in data["rows"]:
        assert r["weight"] == pytest.approx(state["best"]["params"]["token_weights"][r["index"]])
        assert 0 < r["spread"] < 1
    assert data["seeds"] == 4 and data["generation"] == 4


def test_analyze_keeps_its_table_and_the_report_shows_it(analysed, capsys):
    main(["analyze", str(analysed), "--json"])  # measured once (the fixture's first call may be this one)
    stamp = (analysed / "analysis.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["analyze", str(analysed)]) == 0  # this generation's table: printed, not measured again
    out = capsys.readouterr().out
    assert (analysed / "analysis.json").stat().st_mtime_ns == stamp
    assert "verdict" in out and "tight:" in out and "picture" in out
    page = (analysed / "index.html").read_text()
    assert "Which tokens lock it in" in page and "report/tokens.png" in page
    assert (analysed / "report" / "tokens.png").stat().st_size > 5000
    # token weights are shown beside their tokens, on the run page and on generation pages
    assert "picture " in page and " · star " in page
    generation = (analysed / "generations" / "0003" / "index.html").read_text()
    assert " · star " in generation


def test_placeholders_are_analysed_too(finished_analysed):
    """The shared small run searches the default number of placeholder vectors: they are rows of
    the table (after the prompt's words, whatever their place in the prompt), and removing one
    renders the prompt with the others."""
    from embedpin.config import SearchConfig

    run, a = finished_analysed
    n = SearchConfig().n_vectors
    assert [r.placeholder for r in a.rows][-n - 1:] == [False] + [True] * n
    assert [r.token for r in a.rows][-n:] == [f"<v{i}>" for i in range(n)]
    assert all(np.isfinite([r.remove, r.zero, r.double]).all() for r in a.rows)
    assert read_analysis(run) == a


def test_a_malformed_analysis_file_is_one_error_line(finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / finished.name)
    (run / "analysis.json").write_text('{"generation": "x"}')
    with pytest.raises(InputError):
        read_analysis(run)
    assert main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert TokenAnalysis.from_json(json.loads('{"generation": 1, "loss": 0.5, "plain": null, "seeds": 4, '
                                              '"tight": 0.1, "irrelevant": 0.01}'), "x").rows == []
    assert load_run(run).count == 3
