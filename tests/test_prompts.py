"""Prompts as users write them: A1111 emphasis syntax, 75-token chunks, placeholders that
spill into a new chunk, and runs and exports of long prompts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedpin.guidance.context import GuidanceOptions, make_context
from embedpin.guidance.deltas import emphasis
from embedpin.guidance.emphasis import BREAK, parse_emphasis
from embedpin.guidance.encode import encode_negative, encode_prompt
from embedpin.guidance.tokens import chunk_count, tokenize
from embedpin.models.loader import load_components

LONG = ", ".join(["a large red star at the top left on a plain blue background"] * 9)  # 125 tokens


@pytest.fixture(scope="module")
def comp():
    return load_components("micro")


@pytest.mark.parametrize("prompt, want", [
    ("a red star", [("a red star", 1.0)]),
    ("a (red) star", [("a ", 1.0), ("red", 1.1), (" star", 1.0)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
    ("(red star:1.3) on blue", [("red star", 1.3), (" on blue", 1.0)]),
    ("(a (red:2) star)", [("a ", 1.1), ("red", 2.2), (" star", 1.1)]),
    ("(red:0.5)", [("red", 0.5)]),
    (r"a \(red\) star", [("a (red) star", 1.0)]),
    (r"\[x\] \\ y", [("[x] \\ y", 1.0)]),
    ("(unclosed red", [("unclosed red", 1.1)]),  # an open bracket weights all after it
    ("[unclosed", [("unclosed", 1 / 1.1)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # closing brackets with no opening one are text
    ("(time: noon)", [("time: noon", 1.1)]),  # a colon that is not ":number)" is text
    ("(red:1.2.3)", [("red:1.2.3)", 1.1)]),  # not a number: text, and the bracket stays open
    ("a BREAK b", [("a", 1.0), ("BREAK", BREAK), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # BREAK only as a word of its own
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_emphasis_syntax_as_a1111_reads_it(prompt, want):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab ():[]\\1.5BREAK", max_size=40))
def test_any_prompt_parses_to_positive_weights(prompt):
    frags = parse_emphasis(prompt)
    assert frags and all(w > 0 or w == BREAK for _, w in frags)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abc xyz,:.15", min_size=1, max_size=30))
def test_text_without_brackets_is_kept_as_written(prompt):
    assert parse_emphasis(prompt) == [(prompt, 1.0)]
    if ":" not in prompt:  # (":1)" would be an explicit weight)
        inside = parse_emphasis(f"({prompt})")
        assert [t for t, _ in inside] == [prompt] and all(w == pytest.approx(1.1) for _, w in inside)


def test_a_short_prompt_tokenizes_as_the_tokenizer_does(comp):
    for prompt in ("a red star", "", "a large red star at the top left, on a plain blue background!"):
        want = comp.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        t = tokenize(comp, prompt)
        assert torch.equal(t.ids.cpu(), want.input_ids) and t.chunks == 1
        assert t.positions.tolist() == list(range(1, len(t.positions) + 1))


def test_a_long_prompt_is_encoded_in_chunks_of_75_tokens(comp):
    t = tokenize(comp, LONG)
    ids = comp.tokenizer(LONG, add_special_tokens=False).input_ids
    assert len(ids) > 75 and t.chunks == 2 and len(t.positions) == len(ids)  # nothing is cut
    bos, eos = comp.tokenizer.bos_token_id, comp.tokenizer.eos_token_id
    assert t.ids[0, 0] == bos and t.ids[0, 76] == eos and t.ids[0, 77] == bos
    assert t.ids[0, t.positions].tolist() == ids
    enc = encode_prompt(comp, LONG)
    second = comp.tokenizer.decode(ids[75:])
    alone = encode_prompt(comp, second)  # the second chunk is encoded on its own
    torch.testing.assert_close(enc.hidden[:, 77:], alone.hidden, atol=1e-5, rtol=1e-5)


def test_break_starts_a_new_chunk(comp):
    t = tokenize(comp, "a red star BREAK on blue")
    assert t.chunks == 2 and t.positions.tolist() == [1, 2, 3, 78, 79]


def test_the_written_weights_are_the_plain_prompt(comp):
    enc = encode_prompt(comp, "a (red:1.5) star on [blue]")
    assert enc.token_strings[:7] == ["<|startoftext|>", "a</w>", "red</w>", "star</w>", "on</w>", "blue</w>",
                                     "<|endoftext|>"]  # brackets and weights are not tokens
    assert enc.weights.tolist() == pytest.approx([1.0, 1.5, 1.0, 1.0, 1 / 1.1])
    plain = encode_prompt(comp, "a red star on blue")
    assert torch.equal(enc.raw, plain.hidden)
    torch.testing.assert_close(enc.hidden, emphasis(plain.hidden, enc.weights[None], enc.positions))


def test_searched_token_weights_multiply_the_written_ones(comp):
    from embedpin.guidance.build import build

    ctx = make_context(comp, "a (red:1.5) star")
    assert torch.equal(build(ctx, {}).prompt_embeds, ctx.plain.hidden)
    ones = build(ctx, {"token_weights": torch.ones(1, 3)}).prompt_embeds
    torch.testing.assert_close(ones, ctx.plain.hidden)  # weight 1 keeps the written emphasis
    twice = build(ctx, {"token_weights": torch.tensor([[1.0, 2.0, 1.0]])}).prompt_embeds
    want = emphasis(ctx.plain.raw, torch.tensor([[1.0, 3.0, 1.0]]), ctx.plain.positions)
    torch.testing.assert_close(twice, want)


def test_placeholders_spill_into_a_new_chunk_and_prompt_and_negative_match(comp):
    prompt = " ".join(["star"] * 74)
    ctx = make_context(comp, prompt, "a green circle", options=GuidanceOptions(n_vectors=2, init_word="circle"))
    assert ctx.plain.placeholders.tolist() == [75, 78] and ctx.plain.n_tokens == 76
    assert ctx.plain.hidden.shape == ctx.negative.hidden.shape == (1, 154, 64)
    assert chunk_count(comp, prompt, 2) == 2 and chunk_count(comp, "a green circle") == 1
    long_negative = make_context(comp, "a star", LONG)
    assert long_negative.plain.hidden.shape == long_negative.negative.hidden.shape == (1, 154, 64)
    assert torch.equal(encode_negative(comp, "", chunks=2).hidden[:, 77:], encode_prompt(comp, "").hidden)


@pytest.mark.parametrize("blocks", ["token_vectors,token_weights,guidance", "delta,cfg"])
def test_every_block_acts_on_a_long_prompt(comp, blocks):
    from embedpin.guidance.build import build, distance
    from embedpin.optimizer.space import SearchSpace

    guide = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    options = GuidanceOptions(n_vectors=2, init_word="circle", delta_k=4, vector_k=4)
    ctx = make_context(comp, LONG, guide=guide, options=options)
    space = SearchSpace(ctx.blocks(blocks.split(",")))
    x = torch.randn(3, space.n, generator=torch.Generator().manual_seed(1)).numpy() * 0.5
    cond = build(ctx, {k: torch.as_tensor(v) for k, v in space.decode(x).items()})
    assert cond.prompt_embeds.shape == (3, 154, 64) and torch.isfinite(cond.prompt_embeds).all()
    assert (distance(ctx, cond) > 0).all()
    headers = cond.prompt_embeds[:, ::77] - ctx.plain.hidden[:, ::77]
    if "delta" in blocks:  # the delta leaves every chunk's header (BOS) as it is
        assert headers.abs().max() == 0
    if "token_weights" in blocks:
        size = space.blocks[[b.name for b in space.blocks].index("token_weights")].size
        assert size == ctx.plain.n_tokens == len(comp.tokenizer(LONG, add_special_tokens=False).input_ids) + 2


def test_a_long_prompt_runs_and_its_export_drives_diffusers(tmp_path):
    from pathlib import Path

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from embedpin.cli import main
    from embedpin.models.loader import MICRO_DIR

    star = Path(__file__).resolve().parents[1] / "examples" / "star.png"
    args = ["optimize", "--target", str(star), "--prompt", LONG, "--out", str(tmp_path / "runs"), "--inversion-steps",
            "2", "--generations",
            "1", "--population", "4", "--batch", "2", "--steps", "3", "--validation-seeds", "2", "--quiet"]
    assert main(args) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    assert main(["export", str(run), "--format", "diffusers", "-o", str(tmp_path / "e.safetensors")]) == 0
    t = load_file(str(tmp_path / "e.safetensors"))
    assert t["prompt_embeds"].shape == t["negative_prompt_embeds"].shape == (1, 154, 64)
    pipe = StableDiffusionPipeline.from_pretrained(str(MICRO_DIR), local_files_only=True)
    img = pipe(**t, num_inference_steps=3, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_a_text_target_cut_by_clip_says_so(tmp_path, capsys):
    from embedpin.api import run_config
    from embedpin.evaluation.session import Session

    s = Session.prepare(run_config(prompt="a star", text_target=LONG, clip_weight=1.0, flip_weight=0.0,
                                   blocks="token_weights", out=str(tmp_path)))
    assert any("--text-target is 125 tokens" in n and "cut" in n for n in s.notes)
