"""Train the micro model from a seed: tokenizer -> CLIP -> VAE -> UNet.

    python -m embedpin.models.micro.train [--out DIR] [--seed 0] [--smoke] [--from-stage vae]

Every stage writes its part of a diffusers-format folder (loads with plain
``StableDiffusionPipeline.from_pretrained``) plus ``clip/`` (the full CLIPModel, with
the image tower embedpin uses for image guidance and the CLIP loss). ``--smoke`` runs
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

from embedpin.models.micro import arch, dataset

DEFAULT_OUT = Path(__file__).parent / "weights"


@dataclass
class Budget:
    clip_steps: int = 1500
    clip_batch: int = 128
    vae_steps: int = 600
    vae_batch: int = 24
    unet_images: int = 30000
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_finetune_steps: int = 1500  # second phase: continue from phase 1 at a lower peak lr

    @classmethod
    def smoke(cls) -> "Budget":
        return cls(3, 8, 3, 4, 64, 3, 8, 0)


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


def train_clip(tok, budget: Budget, rng: np.random.Generator):
    """Contrastive CLIP (Radford et al. 2021, eq. in Fig. 3) on procedural captions."""
    from transformers import CLIPModel

    model = CLIPModel(arch.clip_config(tok)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(budget.clip_steps):
        imgs, caps, _ = dataset.batch(rng, budget.clip_batch, p_two=0.15)
        enc = tok(caps, padding="longest", return_tensors="pt")
        pix = (torch.from_numpy(imgs) - 0.5) / 0.5
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pix)
        labels = torch.arange(len(caps))
        loss = (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2
        _set_lr(opt, _lr(step, budget.clip_steps, 1e-3))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _log("clip", step, budget.clip_steps, loss.item(), t0)
    return model.eval()


def train_vae(budget: Budget, rng: np.random.Generator, gen: torch.Generator):
    """AutoencoderKL (Rombach et al. 2022) with L1 + MSE reconstruction and a small KL term."""
    from diffusers import AutoencoderKL

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
def _encode_dataset(vae, text_encoder, tok, n: int, rng: np.random.Generator, chunk: int = 256):
    latents, caps = [], []
    for i in range(0, n, chunk):
        imgs, c, _ = dataset.batch(rng, min(chunk, n - i), p_two=0.15)
        latents.append(vae.encode(torch.from_numpy(imgs) * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
        caps += c
    return torch.cat(latents), caps


def train_unet(vae, text_encoder, tok, sched_cfg: dict, budget: Budget, rng, gen, init=None, peak_lr=1e-3):
    """Epsilon-prediction DDPM training (Ho et al. 2020, eq. 14) with min-SNR-5 weighting
    (Hang et al. 2023) and 10% caption dropout so classifier-free guidance works."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = (UNet2DConditionModel.from_pretrained(init) if init else UNet2DConditionModel(**arch.unet_config())).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    noise_sched = DDPMScheduler.from_config(sched_cfg)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    latents, caps = _encode_dataset(vae, text_encoder, tok, budget.unet_images, rng)
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


def main(argv=None) -> int:
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    from embedpin.models.micro.tokenizer import save_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage (seconds), for tests")
    p.add_argument("--from-stage", choices=["clip", "vae", "unet"], default="clip",
                   help="reuse the stages before this one from --out")
    p.add_argument("--finetune-unet", action="store_true",
                   help="continue training the UNet in --out (second phase, peak lr 3e-4) instead of from scratch")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Budget field, e.g. --budget unet_steps=4000")
    a = p.parse_args(argv)
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
    t = time.time()
    tok = save_tokenizer(dataset.vocabulary(), out / "tokenizer")
    stages = ["clip", "vae", "unet"][["clip", "vae", "unet"].index(a.from_stage):]
    if "clip" in stages:
        rng = np.random.default_rng([a.seed, 1])
        torch.manual_seed(a.seed + 1)  # program entry: each stage's weight init from its own seed
        clip = train_clip(tok, budget, rng)
        clip.save_pretrained(out / "clip")
        write_preprocessor_config(out / "clip")
        text = CLIPTextModel(clip.config.text_config)
        text.load_state_dict(clip.text_model.state_dict())
        text.save_pretrained(out / "text_encoder")
        times["clip_s"] = time.time() - t
    text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    sched_cfg = arch.scheduler_config()
    DDIMScheduler.from_config(sched_cfg).save_pretrained(out / "scheduler")
    if "vae" in stages:
        t = time.time()
        torch.manual_seed(a.seed + 2)
        vae = train_vae(budget, np.random.default_rng([a.seed, 2]), torch.Generator().manual_seed(a.seed + 2))
        vae.save_pretrained(out / "vae")
        times["vae_s"] = time.time() - t
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    if "unet" in stages:
        t = time.time()
        torch.manual_seed(a.seed + 3)
        phase = 4 if a.finetune_unet else 3
        phase_budget = replace(budget, unet_steps=budget.unet_finetune_steps) if a.finetune_unet else budget
        unet = train_unet(vae, text, tok, sched_cfg, phase_budget, np.random.default_rng([a.seed, phase]),
                          torch.Generator().manual_seed(a.seed + phase),
                          init=out / "unet" if a.finetune_unet else None, peak_lr=3e-4 if a.finetune_unet else 1e-3)
        unet.save_pretrained(out / "unet")
        times["unet_finetune_s" if a.finetune_unet else "unet_s"] = time.time() - t
        if budget.unet_finetune_steps and not a.finetune_unet:
            t = time.time()
            unet.save_pretrained(out / "unet")
            torch.manual_seed(a.seed + 4)
            unet = train_unet(vae, text, tok, sched_cfg, replace(budget, unet_steps=budget.unet_finetune_steps),
                              np.random.default_rng([a.seed, 4]), torch.Generator().manual_seed(a.seed + 4),
                              init=out / "unet", peak_lr=3e-4)
            unet.save_pretrained(out / "unet")
            times["unet_finetune_s"] = time.time() - t
    _write_index(out)
    info = {"seed": a.seed, "smoke": a.smoke, "budget": asdict(budget), "seconds": times,
            "torch_threads": torch.get_num_threads()}
    prev = out / "train_info.json"
    if prev.exists() and a.from_stage != "clip":
        old = json.loads(prev.read_text())
        info["seconds"] = {**old.get("seconds", {}), **times}
    prev.write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
