"""Batched torch LDR-ꟻLIP (embedpin.scoring.flip) vs NVIDIA's ``flip-evaluator`` called
once per pair, side by side on the same CPU, on natural-image pairs (scikit-image's
bundled photos with noise, blur, JPEG, shift and colour distortions).

Both sides run on the same number of CPU threads (``--threads``, default 1: OpenMP's
spinning threads make multi-threaded timings meaningless on a shared machine) and are
timed in process CPU time (robust to other jobs on the machine), best of ``--repeats``. Headline figures, printed last: speed-ups
reference time / torch time (goal >= 3) for 64 pairs at 64x64 and 8 pairs at 512x512
(both images of every pair processed, as the reference does), the same with the
reference side prepared once (a run's situation with fixed targets), and the largest
deviation from the reference over the test set.

    python benchmarks/scoring.py [--threads 1] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time


def _threads_from_argv() -> str:
    """--threads must reach OpenMP before flip_evaluator (and torch) load it."""
    argv = sys.argv[1:]
    return argv[argv.index("--threads") + 1] if "--threads" in argv[:-1] else "1"


os.environ["OMP_NUM_THREADS"] = _threads_from_argv()

import flip_evaluator  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.transform import resize  # noqa: E402

from embedpin.scoring.flip import flip_features, flip_loss  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")
DISTORTIONS = ("noise", "blur", "jpeg", "shift", "colour")


def photo(name: str, size: tuple[int, int], offset: int = 0) -> np.ndarray:
    """A bundled photo, RGB float32 [H, W, 3] in [0, 1], cropped (from ``offset``) and resized."""
    im = getattr(skimage.data, name)()
    im = np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3]
    h, w = im.shape[:2]
    side = min(h, w) - offset
    crop = im[offset:offset + side, offset:offset + side]
    return resize(crop, size, anti_aliasing=True).astype(np.float32)


def distort(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A distorted copy of x [H, W, 3] in [0, 1]."""
    h, w = x.shape[:2]
    if kind == "noise":
        y = x + rng.normal(0, 0.06, x.shape)
    elif kind == "blur":
        y = resize(resize(x, (max(1, h // 3), max(1, w // 3)), anti_aliasing=True), (h, w))
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray((x * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=15)
        y = np.asarray(Image.open(buf), dtype=np.float32) / 255
    elif kind == "shift":
        y = np.roll(x, (1, 2), (0, 1))
    else:
        y = x * np.array([1.15, 0.95, 0.8]) + 0.03
    return np.clip(y, 0, 1).astype(np.float32)


def pairs(n: int, size: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n (reference, test) natural-image pairs: [n, H, W, 3] each."""
    rng = np.random.default_rng(seed)
    refs, tests = [], []
    for i in range(n):
        ref = photo(PHOTOS[i % len(PHOTOS)], size, offset=8 * (i // len(PHOTOS)))
        refs.append(ref)
        tests.append(distort(ref, DISTORTIONS[(i // len(PHOTOS) + i) % len(DISTORTIONS)], rng))
    return np.stack(refs), np.stack(tests)


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def reference_flip(refs: np.ndarray, tests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """flip_evaluator per pair: (mean errors [n], maps [n, H, W])."""
    out = [flip_evaluator.evaluate(r.copy(), t.copy(), "LDR", applyMagma=False) for r, t in zip(refs, tests)]
    return np.array([o[1] for o in out]), np.stack([o[0][..., 0] for o in out])


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def speed(n: int, size: int, repeats: int) -> tuple[float, float]:
    """(speed-up, speed-up with a prepared reference) of torch over per-pair flip_evaluator."""
    refs, tests = pairs(n, (size, size), seed=size)
    r, t = to_torch(refs), to_torch(tests)
    prepared = flip_features(r)
    t_ref = best_time(lambda: reference_flip(refs, tests), repeats)
    t_torch = best_time(lambda: flip_loss(t, r), repeats)
    t_prep = best_time(lambda: flip_loss(t, prepared), repeats)
    print(f"{n} pairs at {size}x{size}, CPU time: flip_evaluator {1e3 * t_ref / n:.2f} ms/pair, "
          f"torch {1e3 * t_torch / n:.2f} ms/pair, torch (prepared reference) {1e3 * t_prep / n:.2f} ms/pair")
    return t_ref / t_torch, t_ref / t_prep


def deviation(size: int) -> tuple[float, float]:
    """Max |mean error difference| and max per-pair mean |map difference| over the test set."""
    refs, tests = pairs(len(PHOTOS) * len(DISTORTIONS), (size, size))
    means, maps = reference_flip(refs, tests)
    ours, our_maps = flip_loss(to_torch(tests), to_torch(refs), return_maps=True)
    mean_dev = np.abs(ours.numpy() - means).max()
    map_dev = np.abs(our_maps.numpy() - maps).mean((1, 2)).max()
    print(f"test set: {len(refs)} pairs at {size}x{size}, reference mean error "
          f"{means.min():.3f}..{means.max():.3f}")
    return float(mean_dev), float(map_dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both implementations")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller test set")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}: {torch.get_num_threads()} thread(s); flip_evaluator per pair: "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    mean_dev, map_dev = deviation(48 if args.quick else 96)
    small, small_prep = speed(64, 64, repeats)
    large, large_prep = speed(8, 512, repeats)
    print(f"speedup_64x64: {small:.2f}")
    print(f"speedup_512x512: {large:.2f}")
    print(f"speedup_64x64_prepared_reference: {small_prep:.2f}")
    print(f"speedup_512x512_prepared_reference: {large_prep:.2f}")
    print(f"max_mean_error_deviation: {mean_dev:.2e}")
    print(f"max_map_mean_abs_deviation: {map_dev:.2e}")


if __name__ == "__main__":
    main()
