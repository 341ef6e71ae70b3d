"""Train the micro model from a seed: tokenizer -> VAE -> CLIP -> UNet.

    python -m embedpin.models.micro.train [--out DIR] [--seed 0] [--smoke] [--stages vae,clip,unet]

Every stage writes its part of a diffusers-format folder (loads with plain
``StableDiffusionPipeline.from_pretrained``) plus ``clip/``: the CLIPModel's config, image
tower and projections (image guidance and the CLIP loss); its text tower is
``text_encoder/``, stored once (``embedpin.models.loader.load_clip`` joins them). ``--smoke`` runs
each stage for a few steps on tiny batches (seconds) for the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel

from embedpin.guidance.blocks import SCALARS
from embedpin.guidance.encode import image_tokens
from embedpin.guidance.flex import FLEX_PARAMS, image_guidance
from embedpin.guidance.mapping import map_image_tokens
from embedpin.guidance.tween import cluster_profile
from embedpin.models.loader import load_clip, save_clip_shared
from embedpin.models.micro import arch, dataset
from embedpin.models.micro.tokenizer import save_tokenizer

DEFAULT_OUT = Path(arch.__file__).parent / "weights"  # the shipped weights, beside the architecture


@dataclass
class Budget:
    clip_steps: int = 1500
    clip_batch: int = 128
    vae_steps: int = 600
    vae_batch: int = 24
    unet_images: int = 30000
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_finetune_steps: int = 1500  # phase 2: continue from phase 1 at a lower peak lr
    unet_phase3_steps: int = 3000    # phase 3: continue from phase 2 at a lower peak lr still
    unet_image_steps: int = 900      # phase 4: 40% of the samples are image variation

    @classmethod
    def smoke(cls) -> Budget:
        return cls(3, 8, 3, 4, 64, 3, 8, 0, 0, 2)

    def unet_phases(self) -> list[tuple[int, float, float]]:
        """(steps, peak lr, share of image-conditioned samples) of the UNet's phases; each later
        one continues the one before."""
        phases = ((self.unet_steps, 1e-3, 0.0), (self.unet_finetune_steps, 3e-4, 0.0),
                  (self.unet_phase3_steps, 1.5e-4, 0.0), (self.unet_image_steps, 1.5e-4, 0.4))
        return [ph for ph in phases if ph[0]]


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def _log(stage, step, total, loss, t0):
    if step % 100 == 0 or step == total - 1:
        print(f"[{stage}] step {step + 1}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)


def hard_negatives(scene: dataset.Scene, rng: np.random.Generator, others: int = 3) -> list[str]:
    """Captions of ``scene`` with one attribute changed: every other shape of one of its items,
    then ``others`` single changes of colour, size, position or background (4 + others captions)."""
    k = int(rng.integers(len(scene.items)))
    item = scene.items[k]

    def with_item(**kw) -> dataset.Scene:
        items = list(scene.items)
        items[k] = replace(item, **kw)
        return replace(scene, items=tuple(items))

    used_colours = {i.colour for i in scene.items} | {scene.bg_colour}
    used_positions = {i.position for i in scene.items}
    free_colours = [c for c in dataset.COLOUR_NAMES if c not in used_colours]
    changes = [
        lambda: with_item(colour=free_colours[rng.integers(len(free_colours))]),
        lambda: with_item(position=[p for p in dataset.POSITIONS if p not in used_positions][
            rng.integers(len(dataset.POSITIONS) - len(used_positions))]),
        lambda: replace(scene, bg_colour=free_colours[rng.integers(len(free_colours))]),
        lambda: replace(scene, bg_kind=[b for b in dataset.BACKGROUNDS if b != scene.bg_kind][rng.integers(2)]),
    ]
    if len(scene.items) == 1:
        changes.append(lambda: with_item(size="small" if item.size == "large" else "large"))
    out = [with_item(shape=s) for s in dataset.SHAPES if s != item.shape]
    out += [changes[j]() for j in rng.choice(len(changes), size=others, replace=False)]
    return [s.caption for s in out]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of images [n, 3, H, W] (reflect padding)."""
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(3, 1, -1, 1), groups=3)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [n, 3, H, W] in [0, 1] encoded (latent mean) and decoded by ``vae``."""
    z = vae.encode(images * 2 - 1).latent_dist.mean
    return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)


@torch.no_grad()
def _augment(imgs: torch.Tensor, vae, rng: np.random.Generator) -> torch.Tensor:
    """Images [n, 3, H, W] in [0, 1] as renders look: a quarter through the VAE (encode ->
    decode; when there is one), a third blurred (sigma in [0.5, 1.5])."""
    x = imgs.clone()
    rt = torch.from_numpy(rng.random(len(x)) < 0.25)
    if vae is not None and rt.any():
        x[rt] = vae_round_trip(vae, x[rt])
    bl = torch.from_numpy(rng.random(len(x)) < 1 / 3)
    if bl.any():
        x[bl] = _blur(x[bl], float(rng.uniform(0.5, 1.5)))
    return x


def train_clip(tok, budget: Budget, rng: np.random.Generator, vae=None):
    """Contrastive CLIP (Radford et al. 2021, Fig. 3) on procedural captions, with hard negatives.

    Each image is also contrasted with its own caption changed in one attribute (every other
    shape, then random colour / size / position / background changes): with random in-batch
    negatives alone the towers learn colours and backgrounds and hardly any shape, and the
    text tower is the UNet's text encoder, so what it does not encode cannot be drawn.
    The text projection is fixed to the identity, so image features (and FlexDiffuse's
    projected image tokens) live in the text encoder's output space. Images are augmented to
    look like renders (:func:`_augment`, with ``vae``).
    """
    model = CLIPModel(arch.clip_config(tok))
    d = model.text_projection.weight.shape[0]
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(d))
    model.text_projection.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(budget.clip_steps):
        imgs, caps, scenes = dataset.batch(rng, budget.clip_batch, p_two=0.15)
        negs = [c for s in scenes for c in hard_negatives(s, rng)]
        enc = tok(caps + negs, padding="longest", return_tensors="pt")
        text = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
        pix = (_augment(torch.from_numpy(imgs), vae, rng) - 0.5) / 0.5
        image = F.normalize(model.get_image_features(pixel_values=pix).pooler_output, dim=-1)
        n = len(caps)
        own, hard = text[:n], text[n:].view(n, -1, text.shape[-1])
        scale = model.logit_scale.exp().clamp(max=100)
        per_image = scale * torch.cat([image @ own.T, torch.einsum("nd,nhd->nh", image, hard)], dim=1)
        labels = torch.arange(n)
        loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(scale * own @ image.T, labels)) / 2
        _set_lr(opt, _lr(step, budget.clip_steps, 1e-3))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _log("clip", step, budget.clip_steps, loss.item(), t0)
    return model.eval()


def train_vae(budget: Budget, rng: np.random.Generator, gen: torch.Generator):
    """AutoencoderKL (Rombach et al. 2022) with L1 + MSE reconstruction and a small KL term."""
    vae = AutoencoderKL(**arch.vae_config()).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(budget.vae_steps):
        imgs, _, _ = dataset.batch(rng, budget.vae_batch, p_two=0.3, held_out=None)
        x = torch.from_numpy(imgs) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        _set_lr(opt, _lr(step, budget.vae_steps, 2e-3))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _log("vae", step, budget.vae_steps, loss.item(), t0)
    vae.eval()
    with torch.no_grad():
        imgs, _, _ = dataset.batch(rng, 256, held_out=None)
        std = vae.encode(torch.from_numpy(imgs) * 2 - 1).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


@torch.no_grad()
def _encode_dataset(vae, tok, n: int, rng: np.random.Generator, clip=None, chunk: int = 256):
    """n training images -> (scaled latents [n, 4, h, w], captions, CLIP image tokens in text
    space [n, P, D] (float16; :func:`embedpin.guidance.encode.image_tokens`) or None)."""
    latents, caps, tokens = [], [], []
    for i in range(0, n, chunk):
        imgs, c, _ = dataset.batch(rng, min(chunk, n - i), p_two=0.15)
        x = torch.from_numpy(imgs)
        latents.append(vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
        caps += c
        if clip is not None:
            tokens.append(image_tokens(clip, (x - 0.5) / 0.5).half())
    return torch.cat(latents), caps, (torch.cat(tokens) if tokens else None)


def image_conditioning(text: torch.Tensor, image_tokens: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """embedpin's run-time FlexDiffuse guidance (:func:`embedpin.guidance.flex.image_guidance`,
    default alignment-first mapping with reuse) toward each sample's own image, every parameter
    at its default but linear_start = linear_end = w: text [n, L, D], image_tokens [n, P, D],
    w [n] in [0, 1] -> [n, L, D]."""
    m = map_image_tokens(text, image_tokens.to(text.dtype))
    params = {n: w.new_full(w.shape, SCALARS[n][2]) for n in FLEX_PARAMS}
    params["linear_start"] = params["linear_end"] = w
    return image_guidance(text, m, cluster_profile(m.alignment), params)


@torch.no_grad()
def _guide_toward_images(cond, x0, pick, idx, data, text_encoder, tok, gen) -> None:
    """Image-variation samples, in place: rows ``pick`` of the batch (cond [n, L, D], x0 [n, ...],
    dataset indices idx [n]) become another caption guided with weight w ~ U(0, 1) toward
    their own image's tokens (``data`` = (latents, captions, image tokens)); the target is
    their own image with probability w, else the other caption's image. So guidance weight w
    means "draw the guide with probability w": the renders' expected likeness to the guide
    rises with w, from the caption's image at 0 to the guide's at 1."""
    if not len(pick):
        return
    latents, caps, tokens = data
    other = torch.randint(0, len(caps), (len(pick),), generator=gen)
    ids = tok([caps[i] for i in other.tolist()], padding="max_length", max_length=77, return_tensors="pt").input_ids
    w = torch.rand(len(pick), generator=gen)
    cond[pick] = image_conditioning(text_encoder(ids).last_hidden_state, tokens[idx[pick]], w)
    keep = torch.rand(len(pick), generator=gen) >= w
    x0[pick[keep]] = latents[other[keep]]


def train_unet(vae, text_encoder, tok, sched_cfg: dict, budget: Budget, rng, gen, init=None, peak_lr=1e-3,
               clip=None, image_p: float = 0.0):
    """Epsilon-prediction DDPM training (Ho et al. 2020, eq. 14) with min-SNR-5 weighting
    (Hang et al. 2023) and 10% caption dropout so classifier-free guidance works.

    With ``image_p`` > 0 (and ``clip``), that share of the captioned samples is image-variation
    training (:func:`_guide_toward_images`), so the UNet learns what FlexDiffuse-mapped image
    tokens mean and more image guidance gives renders closer to the guide."""
    unet = (UNet2DConditionModel.from_pretrained(init) if init else UNet2DConditionModel(**arch.unet_config())).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    noise_sched = DDPMScheduler.from_config(sched_cfg)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    latents, caps, guide_tokens = _encode_dataset(vae, tok, budget.unet_images, rng, clip if image_p else None)
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    t0 = time.time()
    for step in range(budget.unet_steps):
        idx = torch.from_numpy(rng.integers(0, len(caps), budget.unet_batch))
        ids = tok([caps[i] for i in idx.tolist()], padding="max_length", max_length=77,
                  return_tensors="pt").input_ids
        drop = torch.rand(len(idx), generator=gen) < 0.1
        ids[drop] = empty
        with torch.no_grad():
            cond = text_encoder(ids).last_hidden_state
        x0 = latents[idx]
        if guide_tokens is not None:
            pick = ((torch.rand(len(idx), generator=gen) < image_p) & ~drop).nonzero()[:, 0]
            _guide_toward_images(cond, x0, pick, idx, (latents, caps, guide_tokens), text_encoder, tok, gen)
        t = torch.randint(0, len(acp), (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        _set_lr(opt, _lr(step, budget.unet_steps, peak_lr, warmup=200 if init is None else 50))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        _log("unet", step, budget.unet_steps, loss.item(), t0)
    unet.load_state_dict(ema)
    return unet.eval()


def write_preprocessor_config(folder: Path):
    """How the micro CLIP expects images: 64x64, scaled to [-1, 1]."""
    cfg = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "crop_size": {"height": arch.IMAGE_SIZE, "width": arch.IMAGE_SIZE}}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def _write_index(out: Path):
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


STAGES = ("vae", "clip", "unet")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage (seconds), for tests")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to train, in the order vae, clip, unet; the others are "
                        "read from --out (default: all)")
    p.add_argument("--unet-phase", type=int, default=0,
                   help="resume the unet stage at this phase (0-based), from the UNet in --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Budget field, e.g. --budget unet_steps=4000")
    a = p.parse_args(argv)
    stages = [x.strip() for x in a.stages.split(",") if x.strip()]
    if not stages or any(x not in STAGES for x in stages):
        p.error(f"--stages takes a comma-separated subset of {', '.join(STAGES)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    budget = Budget.smoke() if a.smoke else Budget()
    for kv in a.budget:
        k, _, v = kv.partition("=")
        if not hasattr(budget, k):
            p.error(f"unknown budget field {k!r}")
        setattr(budget, k, int(v))
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    tok = save_tokenizer(dataset.vocabulary(), out / "tokenizer")
    sched_cfg = arch.scheduler_config()
    DDIMScheduler.from_config(sched_cfg).save_pretrained(out / "scheduler")
    # 1. VAE (independent of the text side)
    if "vae" in stages:
        t = time.time()
        torch.manual_seed(a.seed + 2)  # program entry: each stage's weight init from its own seed
        vae = train_vae(budget, np.random.default_rng([a.seed, 2]), torch.Generator().manual_seed(a.seed + 2))
        vae.save_pretrained(out / "vae")
        times["vae_s"] = time.time() - t
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    # 2. CLIP; its text tower is the pipeline's text encoder
    if "clip" in stages:
        t = time.time()
        torch.manual_seed(a.seed + 1)
        clip = train_clip(tok, budget, np.random.default_rng([a.seed, 1]), vae)
        text = CLIPTextModel(clip.config.text_config)
        text.load_state_dict(clip.text_model.state_dict())
        text.save_pretrained(out / "text_encoder")
        save_clip_shared(clip, out / "clip")  # the text tower is stored once, in text_encoder/
        write_preprocessor_config(out / "clip")
        times["clip_s"] = time.time() - t
    # 3. UNet: from scratch, then phases at lower peak learning rates (each from the last); the
    #    last one also learns image guidance toward the sample's own image (needs the CLIP)
    if "unet" in stages:
        text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
        clip = load_clip(None, out).model.eval()
        for k, (steps, peak, image_p) in enumerate(budget.unet_phases()):
            if k < a.unet_phase:
                continue
            t = time.time()
            torch.manual_seed(a.seed + 3 + k)
            unet = train_unet(vae, text, tok, sched_cfg, replace(budget, unet_steps=steps),
                              np.random.default_rng([a.seed, 3 + k]), torch.Generator().manual_seed(a.seed + 3 + k),
                              init=out / "unet" if k else None, peak_lr=peak, clip=clip, image_p=image_p)
            unet.save_pretrained(out / "unet")
            times[f"unet_phase{k + 1}_s"] = time.time() - t
    _write_index(out)
    info = {"seed": a.seed, "smoke": a.smoke, "budget": asdict(budget), "stages": stages, "seconds": times,
            "torch_threads": torch.get_num_threads()}
    prev = out / "train_info.json"
    if prev.exists() and stages != list(STAGES):
        old = json.loads(prev.read_text())
        info["seconds"] = {**old.get("seconds", {}), **times}
    prev.write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
