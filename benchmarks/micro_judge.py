"""Where the micro model's shape points go: the judge (micro-CLIP) or the generator.

Two readers of the shape, side by side, on the same held-out captions (default 300, as
``micro_model.py``): micro-CLIP zero-shot (each image against its caption with every shape
word) and the silhouette check (``dataset.shape_by_template``, which needs no CLIP), on
the true procedural images, the same after a VAE round trip, and the images plain diffusers
generates from the captions; and micro-CLIP on the generated images whose silhouette is right
(how often the judge reads a well-drawn shape).

    python benchmarks/micro_judge.py [--model FOLDER] [--gen-n 300]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from micro_model import (
    embed,
    held_out_pipeline,
    held_out_scenes,
    render_captions,
    silhouette_right,
    true_images,
    zero_shot_shape,
)


def main() -> None:
    from transformers import CLIPTokenizer

    from embedpin.models.loader import MICRO_DIR, load_clip
    from embedpin.models.micro.train import vae_round_trip

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MICRO_DIR))
    ap.add_argument("--gen-n", type=int, default=300, help="held-out captions (one image each)")
    ap.add_argument("--cfg", type=float, default=5.0)
    a = ap.parse_args()
    clip = load_clip(None, Path(a.model)).model
    tok = CLIPTokenizer.from_pretrained(f"{a.model}/tokenizer")
    scenes = held_out_scenes(a.gen_n)
    pipe = held_out_pipeline(a.model)

    # 1. the images [n, 64, 64, 3] in [0, 1]: true, VAE round trip, generated
    true = true_images(scenes)
    round_trip = vae_round_trip(pipe.vae, torch.from_numpy(true).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    sets = {"true": true, "vae_round_trip": round_trip,
            "generated": render_captions(pipe, [s.caption for s in scenes], a.cfg)}

    # 2. both readers on every set: (micro-CLIP right, silhouette right) [n] each
    right = zero_shot_shape(clip, tok, scenes)
    rows = {name: (right(embed(clip, tok, images=np.ascontiguousarray(x.transpose(0, 3, 1, 2)))),
                   silhouette_right(x, scenes).astype(bool)) for name, x in sets.items()}
    judge, silhouette = rows["generated"]
    squares = silhouette & np.array([s.items[0].shape == "square" for s in scenes])  # the judge's commonest miss
    print(f"(torch threads {torch.get_num_threads()}; {a.gen_n} held-out captions)")
    print(f"{'images':<16}{'micro-CLIP':>12}{'silhouette':>12}")
    for name, (j, s) in rows.items():
        print(f"{name:<16}{j.mean():>12.3f}{s.mean():>12.3f}")
    print(f"micro-CLIP on the {squares.sum()} generated squares with the right silhouette: {judge[squares].mean():.3f}")
    print(f"judge_on_true_images: {rows['true'][0].mean():.3f}")
    print(f"judge_on_vae_round_trips: {rows['vae_round_trip'][0].mean():.3f}")
    print(f"silhouette_on_generated: {silhouette.mean():.3f}")
    print(f"judge_on_generated_with_right_silhouette: {judge[silhouette].mean():.3f}")
    print(f"judge_on_generated: {judge.mean():.3f}")


if __name__ == "__main__":
    main()
