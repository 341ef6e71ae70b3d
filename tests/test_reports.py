"""HTML reports: what the pages of a real (short) micro run show, and edge cases (hostile
text, incremental updates, bad folders) on a synthetic, format-exact run store
(``tests/support/sample_run.py``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from support import sample_run as sample

from embedpin import store as atomic
from embedpin.cli import main
from embedpin.errors import InputError
from embedpin.reports.builder import rebuild, update
from embedpin.reports.images import THUMB_SIZE, thumbnail
from embedpin.reports.lineage import trunk_groups
from embedpin.reports.pages import recipe
from embedpin.reports.templating import num

STAR = Path(__file__).resolve().parents[1] / "examples" / "star.png"
HOSTILE = "<script>alert(1)</script> & <b>bold</b>"
REFRESH = '<meta http-equiv="refresh" content="5">'


class Page(HTMLParser):
    """Collects a page's link/image targets, elements by class, and the text inside each class."""

    VOID = {"img", "meta", "link", "br", "hr", "input", "source"}

    def __init__(self, text: str):
        super().__init__()
        self.refs, self.classes, self.text_of, self._open = [], {}, {}, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [attrs[k] for k in ("href", "src") if k in attrs]
        for cls in (attrs.get("class") or "").split():
            self.classes.setdefault(cls, []).append(attrs)
        if tag not in self.VOID:
            self._open.append((attrs.get("class") or "").split())

    def handle_endtag(self, tag):
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data):
        for cls in {c for classes in self._open for c in classes}:
            self.text_of[cls] = self.text_of.get(cls, "") + data


def page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A 3-generation running run with a hostile prompt, fully built once."""
    root = sample.write_sample_run(tmp_path_factory.mktemp("store") / "runs" / "0001-test", generations=3, population=3,
                                   batch=4, depth=2, prompt=HOSTILE, status="running")
    rebuild(root)
    return root


@pytest.fixture
def run(built, tmp_path) -> Path:
    """A private copy of the built run, for tests that change it."""
    return Path(shutil.copytree(built, tmp_path / "runs" / built.name))


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """A real 2-generation micro run (targets, guide, validation), written by the run loop; it
    searches image guidance beside the vectors, so the targets guide it."""
    out = tmp_path_factory.mktemp("real")
    assert main(["optimize", "--target", str(STAR), "--prompt", "a star", "--blocks", "guidance,token_vectors",
                 "--inversion-steps", "2", "--generations",
                "2", "--population", "4",
                 "--batch", "2", "--steps", "4", "--validation-seeds", "2", "--out", str(out), "--quiet"]) == 0
    (root,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return root


def test_a_real_runs_pages_show_its_targets_guide_pinned_images_and_plots(real):
    state = json.loads((real / "state.json").read_text())
    run_page = page(real / "index.html")
    refs = set(run_page.refs)
    assert {"targets/target_00.png", "targets/guide_00.png"} <= refs  # the guide image is shown (it was not)
    assert {"validation/plain_i00.png", "validation/plain_i01.png"} <= refs  # the plain prompt, validation seeds
    best = state["best"]
    if best["kind"] != "plain":  # the pinned result's own validation images
        assert {f"generations/{best['generation']:04d}/validation/best_i0{b}.png" for b in range(2)} <= refs
    assert {f"report/{plot}.png" for plot in ("loss", "validation", "sigma", "params")} <= refs
    for g in range(2):
        record = json.loads((real / "generations" / f"{g:04d}" / "generation.json").read_text())
        gen_refs = set(page(real / "generations" / f"{g:04d}" / "index.html").refs)
        assert {i for c in record["candidates"] for i in c["images"]} <= gen_refs  # every candidate's images
        assert set(record["errmaps"]) <= gen_refs and record["errmaps"]
    for p in pages(real):
        for ref in page(p).refs:
            if not ref.startswith(("#", "data:")):
                target = p.parent / ref
                assert target.is_file() and target.stat().st_size > 0, (p, ref)
                if target.suffix == ".png":
                    assert Image.open(target).size[0] > 0


def set_status(root: Path, status: str) -> None:
    state = json.loads((root / "state.json").read_text())
    atomic.write_text(root / "state.json", json.dumps(dict(state, status=status)))


def pages(root: Path) -> list[Path]:
    return [root / "index.html", *sorted(root.glob("generations/*/index.html"))]


def test_rebuild_writes_every_generation_page_linked_from_the_run_page(built):
    index = page(built / "index.html")
    for g in range(3):
        gen = built / "generations" / f"{g:04d}" / "index.html"
        assert f"generations/{g:04d}/index.html" in index.refs
        assert len(page(gen).classes["card"]) == 3  # every candidate
        assert len(page(gen).classes["bars"]) == 12  # every image carries its lineage
    rows = re.findall(r"<tr>\s*<td data-v=", (built / "index.html").read_text())
    assert len(rows) == 3


def test_run_page_shows_recipe_plots_animation_and_export_commands(built):
    index = page(built / "index.html")
    text = (built / "index.html").read_text()
    for plot in ("loss", "sigma", "spectrum", "components", "pareto", "params"):
        assert f"report/{plot}.png" in index.refs
    assert "report/best.gif" in index.refs
    with Image.open(built / "report" / "best.gif") as gif:
        assert gif.n_frames == 3
    assert "targets/target_00.png" in index.refs and "targets/guide_00.png" in index.refs
    assert "embedpin export runs/0001-test --format textual-inversion -o pinned.safetensors" in text
    assert "embedpin render runs/0001-test --seed 7 -n 8 -o out/" in text
    assert "micro" in index.text_of["l"] and "guidance, token_weights" in index.text_of["l"]


def test_prompt_is_shown_as_text_never_as_markup(built):
    text = (built / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
    assert "<script>alert(1)" not in text and "<b>bold" not in text
    assert text.count("<script") == 1  # the page's own script only
    assert page(built / "index.html").text_of["prompt"] == HOSTILE


def test_pages_are_self_contained_and_every_reference_resolves(built):
    for path in pages(built):
        refs = page(path).refs
        assert refs
        for ref in refs:
            if ref.startswith("#") or ref == "data:,":
                continue
            assert ":" not in ref and not ref.startswith("/"), f"{path}: non-local reference {ref}"
            assert (path.parent / ref).is_file(), f"{path}: {ref} does not exist"
        assert "http" not in re.sub(r"http-equiv", "", path.read_text())


def test_refresh_while_running_on_run_page_and_latest_generation_only(built):
    assert REFRESH in (built / "index.html").read_text()
    assert REFRESH in (built / "generations" / "0002" / "index.html").read_text()
    assert REFRESH not in (built / "generations" / "0000" / "index.html").read_text()


@pytest.mark.parametrize("status", ["finished", "interrupted"])
def test_no_refresh_once_the_run_has_ended(run, status):
    set_status(run, status)
    update(run)
    for path in pages(run):
        assert REFRESH not in path.read_text(), path


def test_update_is_incremental_and_adds_a_generation(run):
    rng = np.random.default_rng(5)
    old = run / "generations" / "0000" / "index.html"
    before = old.stat().st_ino, old.stat().st_mtime_ns
    state = json.loads((run / "state.json").read_text())
    entry = sample.write_generation(run, 3, rng, population=3, batch=4, depth=2, size=64, errmaps=True)
    sample.write_state(run, "running", state["history"] + [entry], pareto=True, rng=rng)
    update(run, 3)
    assert (old.stat().st_ino, old.stat().st_mtime_ns) == before  # old pages untouched
    assert "../0003/index.html" in page(run / "generations" / "0002" / "index.html").refs  # "next" link
    assert REFRESH not in (run / "generations" / "0002" / "index.html").read_text()
    assert REFRESH in (run / "generations" / "0003" / "index.html").read_text()
    assert "generations/0003/index.html" in page(run / "index.html").refs
    with Image.open(run / "report" / "best.gif") as gif:
        assert gif.n_frames == 4


def test_lineage_colours_show_shared_trunks(built):
    card = (built / "generations" / "0001" / "index.html").read_text().split('class="card')[1]
    bars = [re.findall(r'background: (hsl\([^)]*\))', b) for b in card.split('class="bars"')[1:]]
    assert [len(b) for b in bars] == [3, 3, 3, 3]  # root + two branch points
    assert len({b[0] for b in bars}) == 1  # one trunk at the start
    assert bars[0][1] == bars[1][1] != bars[2][1] == bars[3][1]  # two branches after the first split
    assert len({b[2] for b in bars}) == 4  # every image is its own leaf


def test_generation_page_shows_error_maps_histogram_and_losses(built):
    gen = page(built / "generations" / "0000" / "index.html")
    record = json.loads((built / "generations" / "0000" / "generation.json").read_text())
    assert "report/histogram.png" in gen.refs
    assert [r for r in gen.refs if r.startswith("errmaps/")] == record["errmaps"]
    best = next(c for c in record["candidates"] if c["index"] == record["best_candidate"])
    assert len(gen.classes["best"]) == 1
    for value in [best["loss"], *best["image_losses"]]:
        assert num(value) in gen.text_of["card"]


def test_thumbnails_exist_are_smaller_and_made_once(tmp_path):
    root = sample.write_sample_run(tmp_path / "runs" / "0002-big", generations=1, population=1, batch=2,
                                   depth=1, size=192, status="finished", pareto=False)
    update(root, 0)
    images = sorted((root / "generations" / "0000" / "images").glob("*.png"))
    thumbs = [root / "generations" / "0000" / "report" / "thumbs" / "images" / f"{p.stem}.jpg" for p in images]
    for image, thumb in zip(images, thumbs):
        with Image.open(thumb) as t:
            assert max(t.size) == THUMB_SIZE
        assert thumb.stat().st_size < image.stat().st_size / 4
        assert f"report/thumbs/images/{thumb.name}" in page(root / "generations" / "0000" / "index.html").refs
    stamps = [(t.stat().st_ino, t.stat().st_mtime_ns) for t in thumbs]
    update(root, 0)
    assert [(t.stat().st_ino, t.stat().st_mtime_ns) for t in thumbs] == stamps
    assert "report/pareto.png" not in page(root / "index.html").refs  # no size limiter, no front


def test_a_small_image_is_its_own_thumbnail_and_a_missing_one_has_none(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(small)
    assert thumbnail(small, tmp_path / "t.jpg") == small and not (tmp_path / "t.jpg").exists()
    assert thumbnail(tmp_path / "absent.png", tmp_path / "t.jpg") is None


def test_no_temporary_files_are_left(built):
    assert [p for p in built.rglob("*") if p.name.endswith(".tmp")] == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = atomic.write_text(tmp_path / "index.html", "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def test_an_empty_run_gets_a_run_page(tmp_path):
    root = sample.write_sample_run(tmp_path / "0003-empty", generations=0, targets=False)
    text = update(root).read_text()
    assert "No generation completed yet" in text and "pins to its own first generated batch" in text


def test_bad_run_folders_raise_input_errors(run, tmp_path):
    with pytest.raises(InputError, match="not a run folder"):
        rebuild(tmp_path)
    with pytest.raises(InputError, match="generation 9"):
        update(run, 9)
    record_path = run / "generations" / "0001" / "generation.json"
    record = json.loads(record_path.read_text())
    record["candidates"][0]["images"][0] = "../../../outside.png"
    record_path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="malformed image path"):
        update(run, 1)
    record_path.write_text("{not json")
    with pytest.raises(InputError, match="unreadable run file"):
        update(run, 1)


def test_recipe_and_settings_come_from_the_typed_run_config():
    from embedpin.config import RunConfig
    from embedpin.reports.pages import config_rows

    run_config = RunConfig()
    run_config.prompt.prompt, run_config.search.blocks, run_config.optim.seed = "a cat", ["delta", "tokens"], 7
    assert recipe(run_config) == dict(prompt="a cat", negative="", model="micro", blocks="delta, tokens", seed=7)
    rows = dict(config_rows(run_config))
    assert rows["optim.seed"] == "7" and rows["render.batch"] == str(run_config.render.batch)
    assert "model.clip" not in rows and "render.steps" not in rows  # unset: empty, or the model's (filled in by a run)
    assert recipe(None) == dict.fromkeys(("prompt", "negative", "model", "blocks", "seed")) and config_rows(None) == []


def test_trunk_groups_fixed_example():
    lineage = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
    assert trunk_groups(lineage).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 1, 3]]
    assert trunk_groups(lineage[::-1]).tolist() == [[0, 1, 3], [0, 1, 2], [0, 0, 1], [0, 0, 0]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12).flatmap(lambda b: st.integers(0, 4).flatmap(
    lambda k: st.lists(st.lists(st.integers(0, 2), min_size=k, max_size=k), min_size=b, max_size=b))))
def test_trunk_groups_match_shared_prefixes(rows):
    lineage = np.array(rows, dtype=np.int64).reshape(len(rows), -1)
    groups = trunk_groups(lineage)
    for d in range(lineage.shape[1]):
        same_prefix = (lineage[:, None, : d + 1] == lineage[None, :, : d + 1]).all(-1)
        assert ((groups[:, None, d] == groups[None, :, d]) == same_prefix).all()
        assert sorted(set(groups[:, d].tolist())) == list(range(len(set(map(tuple, lineage[:, : d + 1])))))


def test_num_formats_table_cells():
    assert [num(None), num(3), num(0.123456), num(12345.6), num(0.0001234), num(0.0)] == [
        "–", "3", "0.1235", "1.235e+04", "1.234e-04", "0"]
