"""What a generation costs at a real checkpoint's size, stage by stage.

SD 1.5's and SDXL's published architectures (their config.json values, written below) are
built with random weights — nothing is downloaded — with an image tower of CLIP ViT-L/14's
architecture and the micro model's tokenizer. A real run (``embedpin.runner.run``, default
settings: the inversion stage, shortened, then CMA-ES on the token vectors) runs two generations at
a reduced size; the second one is measured (the first includes the lazy, once-per-run bases).

Stages are timed where they run, exclusive of the stages nested in them: text encoding and
guidance (``guidance.build`` and ``distance``), the UNet (its forward calls), the VAE (decode
and encode), ꟻLIP (the scorer's ꟻLIP and error maps), CLIP (the image tower's forward calls),
the optimizer, store and reports (what is left of committing a generation and writing its
pages). Random weights render noise-like images; the run folder's bytes per image are
measured on that run and, for realistic content, by ``benchmarks/run_folder.py``.

    python benchmarks/real_scale.py [--arch sd15,sdxl] [--size 128] [--dtype float32] [--device cpu]

Prints peak memory (RSS, and CUDA when used), seconds per UNet image-evaluation, each
stage's share of the generation and the run folder's bytes per rendered image; the
headline figures last.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

# published configs (diffusers layout), abbreviated to what differs from the library defaults
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
                 cross_attention_dim=768)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
VIT_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu")
BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
VIT_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                 num_train_timesteps=1000)


def _text(tok, spec: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, **spec)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build(arch: str):
    """Components of ``arch`` ("sd15" or "sdxl") with random weights, float32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    from embedpin.models.components import Components, ImageTower
    from embedpin.models.micro.dataset import vocabulary
    from embedpin.models.micro.tokenizer import save_tokenizer

    torch.manual_seed(0)  # weight init of the benchmark's models
    with tempfile.TemporaryDirectory() as d:
        tok = save_tokenizer(vocabulary(), Path(d))
    sdxl = arch == "sdxl"
    unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)).eval()
    vae = AutoencoderKL(**VAE, sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215).eval()
    clip = CLIPModel(CLIPConfig(text_config=dict(VIT_L_TEXT, vocab_size=49408), vision_config=VIT_L_VISION,
                                projection_dim=768)).eval()
    extra = dict(tokenizer_2=tok, text_encoder_2=_text(tok, BIGG_TEXT, True), zero_empty_negative=True) if sdxl else {}
    comp = Components(name=f"random {arch}", tokenizer=tok, text_encoder=_text(tok, VIT_L_TEXT), unet=unet, vae=vae,
                      scheduler_config=dict(SCHEDULER), towers=(ImageTower(clip),), source="random", **extra)
    for m in (*comp.text_encoders, unet, vae, clip):
        m.requires_grad_(False)
    return comp


class Stages:
    """Exclusive seconds per stage: a stage's time excludes the stages nested inside it."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.stack, self.on = device, defaultdict(float), [], False

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        if not self.on:
            yield
            return
        self._sync()
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self._sync()
            _, start, nested = self.stack.pop()
            took = time.perf_counter() - start
            self.seconds[name] += took - nested
            if self.stack:
                self.stack[-1][2] += took

    def wrap(self, owner, attr: str, name: str):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **kw):
            with self.stage(name):
                return fn(*a, **kw)

        setattr(owner, attr, timed)

    def hook(self, module: torch.nn.Module, name: str):
        """Time ``module``'s forward calls."""
        open_ = []

        def enter(*_):
            cm = self.stage(name)
            cm.__enter__()
            open_.append(cm)

        def leave(*_):
            open_.pop().__exit__(None, None, None)  # (a forward hook that returns nothing keeps the output)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def instrument(comp, stages: Stages):
    import embedpin.evaluation.session as session_module
    import embedpin.runner as runner_module
    from embedpin.scoring.scorer import Scorer

    stages.hook(comp.unet, "UNet")
    for t in comp.towers:
        stages.hook(t.model.vision_model, "CLIP")
    stages.wrap(comp.vae, "decode", "VAE")
    stages.wrap(comp.vae, "encode", "VAE")
    stages.wrap(session_module, "build", "text encoding and guidance")
    stages.wrap(session_module, "distance", "text encoding and guidance")
    stages.wrap(Scorer, "flip_per_image", "FLIP")
    stages.wrap(Scorer, "error_maps", "FLIP")
    stages.wrap(runner_module.PinningRun, "commit", "optimizer, store and reports")
    stages.wrap(runner_module.PinningRun, "report", "optimizer, store and reports")


def measure(arch: str, size: int, dtype: str, device: str, out: Path, generations: int = 2) -> dict:
    import embedpin.evaluation.session as session_module
    import embedpin.runner as runner_module
    from embedpin.api import run_config

    comp = build(arch).to(device, getattr(torch, dtype))
    session_module.load_components = lambda *a, **kw: comp  # the run loads our random-weight model
    stages = Stages(comp.device)
    instrument(comp, stages)
    loop = runner_module.PinningRun.loop

    def measured_loop(run):  # time only the last generation
        nonlocal per_generation
        run.total -= 1
        loop(run)
        run.total, stages.on = run.total + 1, True
        t = time.perf_counter()
        result = loop(run)
        per_generation = time.perf_counter() - t
        stages.on = False
        return result

    per_generation = 0.0
    runner_module.PinningRun.loop = measured_loop
    target = str(Path(__file__).resolve().parents[1] / "examples" / "star.png")
    settings = dict(model=comp.name, target=target, prompt="a large red star at the top left on a plain blue background",
                    generations=generations, population=6, batch=4, steps=6, validation_seeds=4, size=size,
                    inversion_steps=2,  # the gradient stage runs once per run, before the generations measured here
                    out=str(out), device=device, dtype=dtype)
    try:
        result = runner_module.run(run_config(**settings))
    finally:
        runner_module.PinningRun.loop = loop
    import json

    state = json.loads((result.run_dir / "state.json").read_text())
    last = state["history"][-1]
    renders = sum(h["renders"] for h in state["history"]) + state["plain_validation"]["renders"]
    folder_bytes = sum(p.stat().st_size for p in result.run_dir.rglob("*") if p.is_file())
    shares = dict(stages.seconds)
    shares["other"] = max(per_generation - sum(shares.values()), 0.0)
    return dict(arch=arch, size=size, seconds=per_generation, stages=shares, unet_evals=last["unet_evals"],
                unet_seconds=shares.get("UNet", 0.0), bytes_per_image=folder_bytes / renders,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                peak_cuda=torch.cuda.max_memory_allocated() if comp.device.type == "cuda" else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15,sdxl")
    p.add_argument("--size", type=int, default=128, help="render size (reduced from the native 512 / 1024)")
    p.add_argument("--sdxl-size", type=int, default=None, help="SDXL's render size (default: --size)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    rows = []
    for arch in a.arch.split(","):
        size = a.sdxl_size or a.size if arch == "sdxl" else a.size
        with tempfile.TemporaryDirectory() as out:
            r = measure(arch, size, a.dtype, a.device, Path(out))
        rows.append(r)
        print(f"{arch} at {size}² ({a.dtype}, {a.device}): generation {r['seconds']:.1f} s, "
              f"{r['unet_evals']} UNet image-evaluations")
        for name, s in sorted(r["stages"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:32s} {s:8.2f} s  {s / r['seconds']:6.1%}")
    for r in rows:
        other = sum(s for k, s in r["stages"].items() if k not in ("UNet", "VAE"))
        print(f"{r['arch']}_peak_rss_gb: {r['peak_rss'] / 2**30:.2f}")
        if r["peak_cuda"]:
            print(f"{r['arch']}_peak_cuda_gb: {r['peak_cuda'] / 2**30:.2f}")
        print(f"{r['arch']}_seconds_per_unet_image_eval: {r['unet_seconds'] / max(r['unet_evals'], 1):.4f}")
        print(f"{r['arch']}_bytes_per_image: {r['bytes_per_image']:.0f}")
        print(f"{r['arch']}_non_unet_vae_share: {other / r['seconds']:.3f}")


if __name__ == "__main__":
    main()
