"""Convergence smoke test of the pinning run on the micro model (benchmarks/generalization.py is
the full measurement): the pinned result beats the plain prompt on the run's validation seeds,
which the search never rendered with, and the in-run figures say so honestly; the run's
textual-inversion file gives that result."""


from embedpin.config import RunConfig
from embedpin.evaluation.session import Session
from embedpin.guidance.encode import encode_prompt
from embedpin.render.sampler import RenderPlan, render
from embedpin.runner import run
from embedpin.store import save_png

PROMPT = "a star"
CAPTION = "a large red star at the top left on a plain blue background"


def _config(target, out, generations):
    c = RunConfig()
    c.prompt.prompt = PROMPT
    c.score.targets = [str(target)] if target else []
    c.render.batch, c.render.steps = 4, 8
    c.optim.generations, c.optim.tol_fun, c.optim.tol_x = generations, 0.0, 0.0
    c.optim.validation_seeds = 8
    c.search.inversion_steps = 40  # an eighth of the default: the suite's time
    c.out = str(out)
    return c.validate()


def test_pinned_result_beats_the_plain_prompt_on_validation_seeds(tmp_path):
    s = Session.prepare(_config(None, tmp_path / "x", 1))
    plan = RenderPlan(batch=1, steps=8, height=64, width=64, seed=4242, hyperbatch=False)
    img = render(s.components, encode_prompt(s.components, CAPTION).hidden, s.ctx.negative.hidden, 5.0,
                 plan).images[0, 0]
    save_png(tmp_path / "target.png", img)
    res = run(_config(tmp_path / "target.png", tmp_path / "runs", 3))
    assert res.validation_loss < 0.8 * res.plain_validation_loss, (res.validation_loss, res.plain_validation_loss)  # 0.63x
    # the default run searches what a textual-inversion file holds: the file is the result
    assert res.file_validation_loss == res.validation_loss
