"""The pinning run end to end on the micro model: CLI, store, resume after SIGKILL, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.micro_run import PROMPT, ROOT, SMALL
from support.micro_run import optimize_args as _optimize
from support.micro_run import runs as _runs

from embedpin.cli import main

# ``finished`` (conftest): the small run, in this process, shared with tests/test_scale_out.py


def _validated(run):
    return [v for g in sorted((run / "generations").glob("*/generation.json"))
            for v in json.loads(g.read_text())["validation"]]


def test_run_folder_is_complete(finished):
    state = json.loads((finished / "state.json").read_text())
    assert state["status"] == "finished" and state["generation"] == 3 and len(state["history"]) == 3
    gen = json.loads((finished / "generations" / "0002" / "generation.json").read_text())
    assert len(gen["candidates"]) == 4 and len(gen["candidates"][0]["images"]) == 4
    for c in gen["candidates"]:
        assert all((finished / "generations" / "0002" / p).is_file() for p in c["images"])
    kinds = [[v["kind"] for v in json.loads((finished / "generations" / f"{g:04d}" / "generation.json")
                                            .read_text())["validation"]] for g in range(3)]
    assert kinds == [["best", "mean"], ["best"], ["best", "mean"]]  # the mean: the start and the end
    assert gen["validation"][0]["index"] == gen["best_candidate"]
    plain = state["plain_validation"]
    assert len(plain["images"]) == 4 and all((finished / p).is_file() for p in plain["images"])
    assert all((finished / p).is_file() for v in gen["validation"] for p in v["images"])
    assert sum(h["renders"] for h in state["history"]) + 4 == 3 * 4 * 4 + 5 * 4 + 4
    assert (finished / "index.html").is_file() and (finished / "generations" / "0000" / "index.html").is_file()
    assert (finished / "pinned.safetensors").is_file() and (finished / "targets" / "target_00.png").is_file()
    assert "refresh" not in (finished / "index.html").read_text().split("<body")[0].lower()


def test_the_search_starts_at_the_best_validated_point_of_the_inversion(finished):
    """The init words and evenly spaced points of the inversion are rendered on the validation
    seeds; the search starts at the lowest (its vectors are the run's ``inversion.safetensors``),
    and the first generation's validated mean, the start itself, scores what the start did."""
    from embedpin.evaluation.session import Session
    from embedpin.store import INVERSION, load_run, read_vectors

    state = json.loads((finished / "state.json").read_text())
    inv = state["inversion"]
    assert [s["step"] for s in inv["starts"]] == [0, 2, 4]  # --inversion-steps 4, 2 points + the init words
    losses = [s["loss"] for s in inv["starts"]]
    assert len(set(losses)) == len(losses)  # each start renders differently
    assert inv["start"] == inv["starts"][int(np.argmin(losses))]["step"]
    assert state["history"][0]["validation"]["mean"] == pytest.approx(min(losses), abs=1e-5)
    session = Session.prepare(load_run(finished).config())
    starts = session.invert()  # the stage again: the same path
    assert starts.steps == (0, 2, 4)
    chosen = starts.steps.index(inv["start"])
    assert np.array_equal(read_vectors(finished / INVERSION), starts.vectors[chosen])
    assert np.array_equal(starts.vectors[0], session.ctx.vector_init.numpy())


def test_inversion_starts_0_starts_the_search_at_the_fits_end(tmp_path):
    from embedpin.evaluation.session import Session
    from embedpin.store import INVERSION, load_run, read_vectors

    tiny = ["--inversion-steps", "3", "--inversion-starts", "0", "--generations", "1", "--population", "2",
            "--batch", "2", "--steps", "2", "--validation-seeds", "2", "--quiet"]
    assert main(["optimize", "--target", str(ROOT / "examples" / "star.png"), "--prompt", PROMPT,
                 "--out", str(tmp_path), *tiny]) == 0
    (run,) = _runs(tmp_path)
    inv = json.loads((run / "state.json").read_text())["inversion"]
    assert inv["steps"] == 3 and "starts" not in inv and "start" not in inv
    starts = Session.prepare(load_run(run).config()).invert()
    assert starts.steps == (0, 3) and np.array_equal(read_vectors(run / INVERSION), starts.vectors[-1])


def test_pinned_result_is_the_validation_best(finished):
    """Pinned = the lowest validation loss over every validated candidate and the plain prompt
    (never worse than the prompt as written), and the pinned file re-rendered on the validation
    seeds gives exactly that loss."""
    from embedpin.config import RunConfig
    from embedpin.evaluation.session import Session
    from embedpin.exports import load_pinned
    from embedpin.render.sampler import render

    state = json.loads((finished / "state.json").read_text())
    losses = [v["loss"] for v in _validated(finished)] + [state["plain_validation"]["loss"]]
    assert state["best"]["validation"] and state["best"]["loss"] == min(losses)
    tensors, recipe = load_pinned(finished)
    assert recipe["loss_on"] == "validation seeds" and recipe["loss"] == state["best"]["loss"]
    s = Session.prepare(RunConfig.from_toml(finished / "config.toml"))
    out = render(s.components, tensors["prompt_embeds"], tensors["negative_prompt_embeds"], recipe["cfg"],
                 s.validation)
    assert float(s.scorer(out.images, out.lineage, out.roots).loss[0]) == pytest.approx(state["best"]["loss"],
                                                                                        abs=1e-5)


def test_validation_seeds_never_overlap_search_seeds(finished):
    """Every noise stream a validation render drew from is one no search render drew from."""
    from embedpin.config import RunConfig
    from embedpin.evaluation.session import Session
    from embedpin.render.noise import member_seed

    searched, validated = set(), set()
    for g in sorted((finished / "generations").glob("*/generation.json")):
        record = json.loads(g.read_text())
        searched |= {s for c in record["candidates"] for row in c["seeds"] for s in row}
        validated |= {s for v in record["validation"] for row in v["seeds"] for s in row}
    assert len(validated) == 4 and len(searched) == 3 * 4 and not searched & validated  # seeds rotate
    s = Session.prepare(RunConfig.from_toml(finished / "config.toml"))
    later = {member_seed(s.search_plan(g).seed, m) for g in range(3, 1000) for m in range(4)}
    assert not later & validated  # nor would any of a longer run's next 997 generations


def test_json_summary_has_validation_figures(finished, tmp_path, capsys):
    assert main(_optimize(tmp_path, "--generations", "1", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = Path(summary["run_dir"])
    state = json.loads((run / "state.json").read_text())
    assert summary["validation_loss"] == state["best"]["loss"]
    assert summary["plain_validation_loss"] == state["plain_validation"]["loss"]
    # the search, its validation (best and mean), the plain prompt's, the three starts' (init words + 2 points)
    assert summary["renders"] == 4 * 4 + 2 * 4 + 4 + 3 * 4


def test_validation_off_pins_the_search_best(tmp_path, capsys):
    assert main(_optimize(tmp_path, "--validation-seeds", "0", "--search-seeds", "fixed", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    state = json.loads((Path(summary["run_dir"]) / "state.json").read_text())
    assert summary["validation_loss"] is None and summary["plain_validation_loss"] is None
    assert state["best"]["loss"] == min(h["best"] for h in state["history"])


def test_same_seed_same_result(finished, tmp_path):
    assert main(_optimize(tmp_path)) == 0
    (run,) = _runs(tmp_path)
    a = json.loads((finished / "state.json").read_text())["history"]
    b = json.loads((run / "state.json").read_text())["history"]
    assert [(h["best"], h["validation"]) for h in a] == [(h["best"], h["validation"]) for h in b]


def test_the_textual_inversion_file_is_the_result_as_users_load_it(finished, tmp_path, capsys):
    """The default run keeps all of its result in its token vectors, so its textual-inversion file
    is its pinned result: exported, loaded into diffusers' own pipeline and used with the prompt
    the export names (the placeholders before the words), it encodes to the pinned conditioning;
    its validation loss (file_validation_loss) is the pinned result's, in the state, the export's
    message and the file's metadata."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from embedpin.exports import load_pinned
    from embedpin.models.loader import MICRO_DIR

    ti = tmp_path / "pinned.safetensors"
    assert main(["export", str(finished), "--format", "textual-inversion", "-o", str(ti)]) == 0
    said = capsys.readouterr()
    state = json.loads((finished / "state.json").read_text())
    file, best = state["file"], state["best"]
    assert file["loss"] == best["loss"] < state["plain_validation"]["loss"] and file["x"] == best["x"]
    with safe_open(str(ti), "pt") as f:
        meta = json.loads(f.metadata()["embedpin"])
    usage = f"<pinned> {PROMPT}"
    assert meta["usage"] == usage and meta["not_carried"] == [] and meta["file_validation_loss"] == file["loss"]
    assert f"use it with the prompt: {usage}" in said.out and f"file_validation_loss {file['loss']:.4f}" in said.out
    assert "note:" not in said.err
    pipe = StableDiffusionPipeline.from_pretrained(str(MICRO_DIR), local_files_only=True)
    pipe.load_textual_inversion(str(ti), token="<pinned>")
    emb, _ = pipe.encode_prompt(usage, "cpu", 1, False)
    tensors, recipe = load_pinned(finished)
    assert (emb - tensors["prompt_embeds"]).abs().max().item() <= 1e-4 and meta["cfg"] == recipe["cfg"]
    img = pipe(usage, num_inference_steps=4, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_a_run_whose_pinned_result_is_the_plain_prompt_exports_no_embedding(finished, tmp_path, capsys):
    import shutil

    from embedpin.exports import _to_bytes, load_pinned

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    tensors, recipe = load_pinned(run)
    (run / "pinned.safetensors").write_bytes(_to_bytes({"prompt_embeds": tensors["prompt_embeds"],
        "negative_prompt_embeds": tensors["negative_prompt_embeds"]}, {**recipe, "candidate": "plain", "params": {}}))
    assert main(["export", str(run), "--format", "textual-inversion", "-o", str(tmp_path / "ti.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beat the plain prompt" in err[0] and not (tmp_path / "ti.safetensors").exists()
    assert main(["export", str(run), "--format", "diffusers", "-o", str(tmp_path / "d.safetensors")]) == 0


def test_export_diffusers_embeds_drive_a_pipeline(finished, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from embedpin.models.loader import MICRO_DIR

    f = tmp_path / "embeds.safetensors"
    assert main(["export", str(finished), "--format", "diffusers", "-o", str(f)]) == 0
    t = load_file(str(f))
    pipe = StableDiffusionPipeline.from_pretrained(str(MICRO_DIR), local_files_only=True)
    img = pipe(prompt_embeds=t["prompt_embeds"], negative_prompt_embeds=t["negative_prompt_embeds"],
               num_inference_steps=4, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_render_command(finished, tmp_path):
    assert main(["render", str(finished), "--seed", "7", "-n", "2", "-o", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pinned_seed7.png", "pinned_seed8.png"]


def test_report_command_rebuilds(finished):
    (finished / "index.html").unlink()
    assert main(["report", str(finished)]) == 0
    assert (finished / "index.html").is_file()


@pytest.mark.parametrize("extra, words", [
    (["--target", "/no/such/target.png"], "target.png"),
    (["--guide", "/no/such/guide.png", "--blocks", "guidance"], "guide.png"),
    (["--size", "30"], "multiple"),
    (["--renoise", "-1"], "--renoise"),
    (["--roots", "3"], "--roots must be a power of two"),
    (["--validation-seeds", "-1"], "--validation-seeds"),
    (["--search-seeds", "sometimes"], "--search-seeds"),
])
def test_bad_input_leaves_no_run(tmp_path, capsys, extra, words):
    argv = ["optimize", "--prompt", PROMPT, "--out", str(tmp_path / "runs"), *SMALL, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert _runs(tmp_path / "runs") == []


def test_init_word_auto_and_guide_target_start_from_what_clip_sees_in_the_target(tmp_path):
    """--init-word auto starts each placeholder at a vocabulary word CLIP ranks high for the target
    (never one of the prompt's words); --guide-target makes the target the guide image."""
    from embedpin.config import RunConfig
    from embedpin.evaluation.session import Session
    from embedpin.guidance.encode import encode_prompt
    from embedpin.guidance.interrogate import rank_words

    c = RunConfig()
    c.prompt.prompt, c.score.targets = "a star", [str(ROOT / "examples" / "star.png")]
    assert (c.search.init_word, c.prompt.guide_target) == ("auto", True)  # the defaults
    assert c.search.blocks == ["token_vectors"] and c.search.n_vectors == 4
    c.search.blocks = ["token_vectors", "token_weights", "guidance"]
    s = Session.prepare(c.validate())
    ranked = rank_words(s.components, s.targets, exclude=["a", "star"], n=4)
    assert len(ranked) == 4 and not {"a", "star"} & {w for w, _ in ranked}
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
    emb = s.components.text_encoder.embeddings.token_embedding
    words = [s.components.tokenizer(w, add_special_tokens=False).input_ids for w, _ in ranked]
    assert torch.allclose(s.ctx.vector_init, torch.stack([emb(torch.tensor(i)).mean(0) for i in words]))
    assert len(s.guide) == 1 and torch.equal(s.guide[0], s.targets[0]) and bool(s.ctx.guided)
    assert {"max_image", "linear_start"} <= set(s.space.names)
    c.score.targets, c.prompt.guide_target = [], False  # self mode: no target to rank words for
    c.search.placement = "after"  # end-of-text vectors after the words: exactly the prompt's own padding
    s = Session.prepare(c.validate())
    assert torch.equal(s.ctx.plain.hidden, encode_prompt(s.components, "a star").hidden)  # starts at the prompt
    assert not {"max_image", "linear_start"} & set(s.space.names)  # "guidance": what a guide allows, none


def _spawn(argv):
    return subprocess.Popen([sys.executable, "-m", "embedpin", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for_generation(out, g, proc, timeout=240):
    t = time.time()
    while time.time() - t < timeout:
        runs = _runs(out)
        if runs and (runs[0] / "state.json").is_file():
            if json.loads((runs[0] / "state.json").read_text())["generation"] >= g:
                return runs[0]
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("timed out")


def _kill_after(proc, seconds: float) -> None:
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_ends_like_uninterrupted(finished, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")  # other moments on every run; printed on failure
    rng = np.random.default_rng(seed)
    out = tmp_path / "killed"
    proc = _spawn(_optimize(out))
    run = _wait_for_generation(out, 1, proc)
    _kill_after(proc, float(rng.uniform(0, 1.0)))  # somewhere inside a later generation (or its writes)
    killed_at = json.loads((run / "state.json").read_text())["generation"]
    if killed_at < 3:  # kill the resumed run too: during its start-up, a generation or the writes
        proc = _spawn(["optimize", "--resume", str(run), "--quiet"])
        _kill_after(proc, float(rng.uniform(0, 4.0)))
    r = subprocess.run([sys.executable, "-m", "embedpin", "optimize", "--resume", str(run), "--quiet", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (seed, r.stderr)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    expected = json.loads((finished / "state.json").read_text())
    assert summary["generations"] == 3, seed
    assert summary["best_loss"] == expected["best"]["loss"], seed
    got = json.loads((run / "state.json").read_text())
    assert [(h["best"], h["validation"]) for h in got["history"]] == \
        [(h["best"], h["validation"]) for h in expected["history"]], seed
    assert got["plain_validation"] == expected["plain_validation"] and got["best"] == expected["best"], seed


def test_ctrl_c_leaves_a_resumable_run(tmp_path):
    out = tmp_path / "int"
    proc = _spawn(_optimize(out))
    run = _wait_for_generation(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "interrupted" and 1 <= state["generation"] < 3


def test_max_distance_pins_the_best_loss_within_the_distance(tmp_path):
    limit = 0.004
    assert main(_optimize(tmp_path, "--max-distance", str(limit))) == 0
    (run,) = _runs(tmp_path)
    state = json.loads((run / "state.json").read_text())
    cands = [c for g in sorted((run / "generations").glob("*/generation.json"))
             for c in json.loads(g.read_text())["candidates"]]
    within = [c for c in cands if c["distance"] <= limit]
    assert within and state["best"]["distance"] <= limit
    validated = [v for v in _validated(run) if v["distance"] <= limit]
    assert [v["kind"] for v in _validated(run)] == ["best"] * 3  # MO-CMA-ES has no single mean
    assert state["best"]["loss"] == min([v["loss"] for v in validated] + [state["plain_validation"]["loss"]])
    front = [(p["loss"], p["distance"]) for p in state["pareto"]]
    assert front and [d for _, d in front] == sorted(d for _, d in front)
    assert all(not (l2 <= l1 and d2 <= d1 and (l2, d2) != (l1, d1)) for l1, d1 in front for l2, d2 in front)
    assert (run / "report" / "pareto.png").is_file()


def test_the_terminal_says_where_the_run_is_and_its_commands_work(tmp_path, capsys, monkeypatch):
    """A run with the progress bar names its report when it starts, and ends with the run folder,
    the pinned figure beside the plain prompt's and the commands to use the result — each of
    which runs as printed."""
    import shlex

    tiny = ["--inversion-steps", "2", "--generations", "1", "--population", "2", "--batch", "2", "--steps", "2",
            "--validation-seeds", "2"]
    monkeypatch.chdir(ROOT)  # the target as a path relative to where the run starts
    assert main(["optimize", "--target", "examples/star.png", "--prompt", PROMPT, "--out", str(tmp_path / "runs"),
                 *tiny]) == 0
    out, err = capsys.readouterr()
    (run,) = _runs(tmp_path / "runs")
    assert err.splitlines()[0] == f"run folder: {run}"
    assert err.splitlines()[1].startswith(f"report: {run / 'index.html'} (open it now")
    lines = out.strip().splitlines()
    lines = lines[lines.index(f"run folder: {run}"):]  # after the generations' lines
    assert "against the plain prompt's" in lines[1] and "on seeds the search never used" in lines[1]
    commands = [line.strip() for line in lines[lines.index("use it:") + 1:]]
    assert [shlex.split(c)[:2] for c in commands] == [["embedpin", "export"]] * 2 + [["embedpin", "render"],
                                                                                      ["embedpin", "analyze"]]
    monkeypatch.chdir(tmp_path)  # the printed folder is runs/<id>, relative to where the user ran it (the run's
    # config.toml names its target by an absolute path, so analyze finds it from here)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    capsys.readouterr()
    assert (tmp_path / "pinned.safetensors").is_file() and (tmp_path / "pinned_embeds.safetensors").is_file()
    assert len(list((tmp_path / "out").glob("*.png"))) == 8
