"""How big a run folder gets at real sizes (goal: a 50-generation run of 15 candidates x 8
images at 512² under 200 MB, everything counted; at most 33 KB per rendered image).

A 50-generation run at 512² takes hours on a GPU, and what its images weigh depends on what
they show, so the total is put together from two measurements:

- the images, at 512², written by the run store's own writers (``store.save_render``: WebP
  previews of every image, full-size PNGs of each generation's best candidate, error-map
  previews) on photographs (scikit-image's sample photos, as much detail as SD renders have
  or more), in the numbers a run writes them: per generation λ x B search renders (B of them
  also at full size), B error maps, 16 validation renders (32 in the first and the last
  generation), and 16 renders of the plain prompt once;
- everything else (records, state, report pages, plots, thumbnails of the targets, the
  GIF, the pinned file) from a real run of the micro model with the same λ and B, whose
  growth per generation is extrapolated to 50 (each of these grows linearly: one folder,
  one history entry, one animation frame per generation).

With ``--keep-images all`` the same sum is shown for full-size PNGs of every image.

    python benchmarks/run_folder.py [--generations 50 --population 15 --batch 8 --size 512]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from embedpin.store import save_png, save_render

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field")


def photographs(size: int) -> list[torch.Tensor]:
    """scikit-image's sample photographs, centre-cropped and resized to size² [3, S, S]."""
    from skimage import data

    from embedpin.images import resize_crop

    out = []
    for name in PHOTOS:
        a = getattr(data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255
        out.append(resize_crop(x, (size, size)))
    return out


def image_bytes(size: int, folder: Path) -> dict[str, float]:
    """Mean bytes of one render as a preview and as a full-size PNG, and of one error map's
    preview (the ꟻLIP map of one photograph against another, coloured as the run colours it)."""
    import matplotlib

    from embedpin.scoring.flip import flip_cross, flip_features

    photos = photographs(size)
    preview = [save_render(folder, f"p{i}.png", p, previews=True)[0] for i, p in enumerate(photos)]
    full = [save_png(folder / f"f{i}.png", p) for i, p in enumerate(photos)]
    maps = flip_cross(torch.stack(photos), flip_features(torch.stack(photos[::-1]), 67.0), 67.0, return_maps=True)
    cmap = matplotlib.colormaps["magma"]
    errmaps = [save_render(folder, f"e{i}.png", cmap(m.clamp(0, 1).numpy())[..., :3].transpose(2, 0, 1), True)[0]
               for i, m in enumerate(maps.diagonal(dim1=0, dim2=1).permute(2, 0, 1))]
    size_of = lambda names: float(np.mean([(folder / n).stat().st_size for n in names]))  # noqa: E731
    return dict(preview=size_of(preview), full=size_of([f.name for f in full]), errmap=size_of(errmaps))


def _non_image_bytes(run: Path) -> int:
    images = {"images", "errmaps", "validation"}
    return sum(p.stat().st_size for p in run.rglob("*") if p.is_file() and not images & set(p.relative_to(run).parts))


def _micro_run(out: str, population: int, batch: int, generations: int) -> tuple[int, int]:
    """(bytes of the run's own files, of its generation folders) but the renders, after a
    micro run of ``generations``."""
    from embedpin.api import optimize

    result = optimize(target=str(Path(__file__).resolve().parents[1] / "examples" / "star.png"),
                      prompt="a large red star at the top left on a plain blue background", generations=generations,
                      population=population, batch=batch, steps=4, out=out)
    gens = _non_image_bytes(result.run_dir / "generations")
    return _non_image_bytes(result.run_dir) - gens, gens


def other_bytes(population: int, batch: int) -> tuple[float, float]:
    """(bytes per generation, fixed bytes) of everything but the renders: the generation
    folders' records and pages, and the growth of the run's own files (state, plots, GIF),
    from real micro runs of 2 and 4 generations."""
    with tempfile.TemporaryDirectory() as out:
        own_2, _ = _micro_run(out, population, batch, 2)
        own_4, gens_4 = _micro_run(out, population, batch, 4)
    growth = (own_4 - own_2) / 2
    return gens_4 / 4 + growth, own_4 - 4 * growth


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generations", type=int, default=50)
    p.add_argument("--population", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--validation-seeds", type=int, default=16)
    a = p.parse_args()
    G, lam, B, V = a.generations, a.population, a.batch, a.validation_seeds
    with tempfile.TemporaryDirectory() as d:
        each = image_bytes(a.size, Path(d))
    per_gen, fixed = other_bytes(lam, B)
    search, validation = G * lam * B, G * V + 2 * V + V  # + the mean in the first and last generation, + plain
    renders = search + validation
    images = search * each["preview"] + G * B * each["full"] + G * B * each["errmap"] + validation * each["preview"]
    everything = images + G * per_gen + fixed
    keep_all = (search + validation) * each["full"] + G * B * each["full"] + G * per_gen + fixed
    print(f"one render at {a.size}²: preview {each['preview'] / 1024:.1f} KB, full-size PNG {each['full'] / 1024:.0f} "
          f"KB, error-map preview {each['errmap'] / 1024:.1f} KB (photographs)")
    print(f"the rest: {per_gen / 1024:.0f} KB per generation (records, pages, plots, frames), {fixed / 1024:.0f} KB "
          f"per run (micro run, λ={lam}, B={B})")
    print(f"{G} generations x {lam} candidates x {B} images + {validation} validation renders = {renders} renders")
    print(f"run_folder_mb: {everything / 2**20:.1f}")
    print(f"bytes_per_render_kb: {everything / renders / 1024:.1f}")
    print(f"keep_images_all_mb: {keep_all / 2**20:.1f}")


if __name__ == "__main__":
    main()
