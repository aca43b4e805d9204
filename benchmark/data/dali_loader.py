"""``recipe.loader: dali``: a batch's pixels made by an NVIDIA DALI pipeline.

The deferred design of loader ``device`` (``methods.augment``): DataLoader workers read the
file bytes and draw every parameter (crop windows, flips, boxes, proposals through
``methods.geometry``; jitter, grayscale, blur, solarize through ``Photometric.draw``), exactly
the draws of the other loaders. The training process then feeds the encoded bytes and the
per-view parameters to a DALI pipeline through ``fn.external_source``: decode (``mixed``,
nvJPEG, on CUDA; ``cpu`` otherwise), each view window cropped and resized, the photometric
augmentations in the order drawn, flip, normalisation, as CHW float32. Cutout rectangles
are erased afterwards in torch, as ``methods.augment.render_views`` erases them.

One pipeline per (device, the view sizes of a batch's slots), built on the first batch and
reused; a larger batch than it was built for rebuilds it once at that size.

Where the pixels differ from loader ``device`` (same parameters; measured in
tests/test_loader_dali.py):
- resampling: DALI's antialiased linear resize over the same fractional window is a
  triangle filter widened by the downscale factor, as PIL's and ``ViewGeometry.apply_tensor``'s;
  equal to ``apply_tensor`` within 1e-3 grey levels (float output: nothing rounded between
  passes) wherever the filter's taps stay inside the image. Where a window touches the
  image border, DALI extends the image by its edge pixels while PIL / ``apply_tensor`` drop
  the missing taps and renormalise: the outermost view pixels (a band about half the
  downscale factor wide) differ by up to ~5 grey levels (tests/test_loader_dali.py);
- hue: DALI's own ``fn.hsv`` rotates the chroma plane of YIQ by degrees (a linear colour
  matrix), not torchvision's shift of H in HSV: at h = 0.08 it is ~15 grey levels from
  torchvision on average. So the hue is not ``fn.hsv``: it is torchvision's RGB -> HSV -> RGB
  (``methods.augment._rgb2hsv`` / ``_hsv2rgb``) written in DALI arithmetic, equal to the
  ``device`` path up to float rounding;
- blur: the same sampled Gaussian (window ``blur_kernel_size(sigma)``, normalised) with
  DALI's reflect-101 border, as torch's ``reflect`` pad: equal up to float rounding;
- JPEG decode: on CPU DALI's decode equals torchvision's (libjpeg-turbo both); on CUDA
  DALI's nvJPEG (``mixed``) and torchvision's nvJPEG may round chroma upsampling and the
  IDCT differently (a grey level here and there).
BYOL's ``jitter_style="tf"`` ops are not expressed here (a method using them does not list
``dali``).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from benchmark.data.errors import CorruptImage
from benchmark.data.io import EncodedImage, read_rgb
from methods.augment import GRAY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, DeferredView, blur_kernel_size
from methods.config import ConfigError

INSTALL_HINT = "pip install -e '.[dali]'"
POSITIONS = 4                    # torchvision's ColorJitter: at most 4 ops, in a drawn order
OPS = ("brightness", "contrast", "saturation", "hue")
# per view, data inputs (on the pipeline's device): per position (a, b, c, h) of
# y = clamp(a x + b gray(x) + c mean(gray(x))), then the hue of y shifted by h turns; then
# gray_first, gray, solarize
_D_LEN = 4 * POSITIONS + 3
# per view, CPU argument inputs: roi (y0, x0, y1, x1), blur sigma; int: flip, blur window
_ARG_LEN = 5


def require_dali() -> None:
    """Raise one clear error when DALI cannot be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"recipe.loader: 'dali' needs NVIDIA DALI, which is not importable here "
                          f"({e}); install it with {INSTALL_HINT}") from None


class DaliImage(EncodedImage):
    """An image file's bytes plus its header size (``recipe.loader: dali``): as
    :class:`EncodedImage`, its pixels made by the DALI pipeline (:func:`render_batch`)."""


def view_params(v: DeferredView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (data, float argument, int argument) inputs of one view: its crop window, flip and
    photometric parameters as the pipeline reads them."""
    p = v.photo
    d = np.zeros(_D_LEN, np.float32)
    d[0:4 * POSITIONS:4] = 1.0                     # identity at every position: a = 1, b = c = h = 0
    if len(p.jitter) > POSITIONS:
        raise ValueError(f"dali loader: {len(p.jitter)} jitter ops, at most {POSITIONS}")
    for pos, (op, f) in enumerate(p.jitter):
        if op == "brightness":                      # f x
            d[4 * pos] = f
        elif op == "contrast":                      # f x + (1 - f) mean(gray(x))
            d[4 * pos], d[4 * pos + 2] = f, 1 - f
        elif op == "saturation":                    # f x + (1 - f) gray(x)
            d[4 * pos], d[4 * pos + 1] = f, 1 - f
        elif op == "hue":                           # H of HSV + f turns
            d[4 * pos + 3] = f
        else:
            raise ValueError(f"dali loader: jitter op {op!r} (jitter_style 'tf') is not expressed in the "
                             f"DALI pipeline; use recipe.loader=device")
    d[4 * POSITIONS] = float(p.gray and p.gray_first)
    d[4 * POSITIONS + 1] = float(p.gray and not p.gray_first)
    d[4 * POSITIONS + 2] = float(p.solarize)
    x0, y0, x1, y1 = v.geom.crop
    sigma = p.blur_sigma if p.blur_sigma > 0 else 1.0
    window = blur_kernel_size(p.blur_sigma) if p.blur_sigma > 0 else 1     # window 1: no blur
    arg = np.array([y0, x0, y1, x1, sigma], np.float32)
    return d, arg, np.array([int(v.geom.flip), window], np.int32)


def _threads() -> int:
    return max(1, min(4, int(os.environ.get("DETBENCH_DALI_THREADS", os.cpu_count() or 1))))


def build_pipeline(sizes: Sequence[tuple[int, int]], batch_size: int, device: torch.device):
    """The pipeline of one slot layout: one decode per image, then per slot (view size
    ``(W, H)``) crop + resize, photometric, flip and normalisation. Outputs: one CHW float32
    batch per slot, then the decoded shapes (HWC)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device.type == "cuda"
    dev = "gpu" if gpu else "cpu"
    weights = list(GRAY_WEIGHTS)
    thr = SOLARIZE_THRESHOLD / 255

    def clamp(x):
        return dmath.clamp(x, 0.0, 1.0)

    def gray(x):   # (H, W, 1), torchvision's rgb_to_grayscale weights
        return fn.coord_transform(x, M=weights)

    def frac(x):   # x mod 1 (x - floor x, torch.remainder's sign)
        return x - dmath.floor(x)

    def shift_hue(x, f):
        """torchvision's adjust_hue on float HWC in [0, 1]: H of HSV + f turns
        (methods.augment._rgb2hsv, then _hsv2rgb's closed form), in DALI arithmetic."""
        r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
        maxc = dmath.max(dmath.max(r, g), b)
        minc = dmath.min(dmath.min(r, g), b)
        eqc = maxc == minc
        cr = maxc - minc
        s = cr / (maxc + eqc * (1.0 - maxc))
        cr_div = cr + eqc * (1.0 - cr)
        rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
        is_r, is_g = maxc == r, maxc == g
        h = (is_r * (bc - gc) + (is_g * (1 - is_r)) * (2.0 + rc - bc)
             + ((1 - is_g) * (1 - is_r)) * (4.0 + gc - rc))
        h = frac(frac(h / 6.0 + 1.0) + f)
        chans = []
        for n in (5.0, 3.0, 1.0):
            k = n + 6.0 * h
            k = k - 6.0 * dmath.floor(k / 6.0)
            chans.append(maxc * (1.0 - s * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)))
        return fn.stack(*chans, axis=2)

    @pipeline_def(batch_size=batch_size, num_threads=_threads(),
                  device_id=(torch.cuda.current_device() if device.index is None else device.index) if gpu else None,
                  prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8)
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False)   # as PIL and torchvision: no EXIF rotation
        outs = []
        for s, (W, H) in enumerate(sizes):
            d = fn.external_source(name=f"d{s}", dtype=types.FLOAT, device=dev)
            arg = fn.external_source(name=f"arg{s}", dtype=types.FLOAT)
            iarg = fn.external_source(name=f"iarg{s}", dtype=types.INT32)
            x = fn.resize(img, size=[H, W], roi_start=arg[0:2], roi_end=arg[2:4], roi_relative=False,
                          interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT) / 255.0
            gf = d[4 * POSITIONS]
            x = gf * gray(x) + (1 - gf) * x                    # grayscale first (MoCo v1's order)
            for pos in range(POSITIONS):                      # each view its own op at each position
                a, b, c, f = d[4 * pos], d[4 * pos + 1], d[4 * pos + 2], d[4 * pos + 3]
                g = gray(x)
                x = clamp(a * x + b * g + c * fn.reductions.mean(g))
                on = f != 0.0                                  # identity where no hue is drawn here
                x = on * shift_hue(x, f) + (1 - on) * x
            gl = d[4 * POSITIONS + 1]
            x = gl * gray(x) + (1 - gl) * x
            x = fn.gaussian_blur(x, sigma=arg[4], window_size=iarg[1])
            sol = d[4 * POSITIONS + 2] * (x >= thr)
            x = x + sol * (1 - 2 * x)
            outs.append(fn.crop_mirror_normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                                 mirror=iarg[0], output_layout="CHW", dtype=types.FLOAT))
        return (*outs, img.shape())

    p = pipe()
    p.build()
    return p


_PIPELINES: dict[tuple, Any] = {}


def pipeline_for(sizes: tuple[tuple[int, int], ...], n: int, device: torch.device):
    """The cached pipeline of this slot layout on ``device``, built for at least ``n``
    samples (built once; rebuilt only for a larger batch than any before)."""
    key = (str(device), sizes)
    p = _PIPELINES.get(key)
    if p is None or p.max_batch_size < n:
        _PIPELINES[key] = p = build_pipeline(sizes, n, device)
    return p


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor(), dtype=np.float32))


def _slots(batch: dict, keys: list[str]):
    """The unique sources in order, and the slots: (key, positions of the key's views, one per
    source, in source order). A key with c views per source gives c slots (SwAV's crops).
    None when some key holds a different number of views per source."""
    sources = list(dict.fromkeys(v.source for k in keys for v in batch[k]))
    slots = []
    for k in keys:
        by_src: dict[Any, list[int]] = {s: [] for s in sources}
        for i, v in enumerate(batch[k]):
            by_src[v.source].append(i)
        counts = {len(ix) for ix in by_src.values()}
        if len(counts) != 1:
            return None
        for j in range(counts.pop()):
            slots.append((k, [by_src[s][j] for s in sources]))
    return sources, slots


def _run(sources: list, slots: list, batch: dict, device: torch.device) -> list[torch.Tensor]:
    """One pipeline run: each source decoded once, each slot's views rendered; the slots'
    (N, 3, H, W) batches in source order."""
    sizes = tuple(batch[k][0].geom.out_size for k, _ in slots)
    p = pipeline_for(sizes, len(sources), device)
    p.feed_input("enc", [np.frombuffer(s.data, dtype=np.uint8) for s in sources])
    for s, (k, idx) in enumerate(slots):
        params = [view_params(batch[k][i]) for i in idx]
        p.feed_input(f"d{s}", [d for d, _, _ in params])
        p.feed_input(f"arg{s}", [a for _, a, _ in params])
        p.feed_input(f"iarg{s}", [i for _, _, i in params])
    try:
        outs = p.run()
    except Exception:
        _PIPELINES.pop((str(device), sizes), None)   # a failed run may leave it unusable
        for s in sources:                            # name the file that does not decode
            read_rgb(s.path)
        raise
    shapes = outs[-1].as_cpu() if hasattr(outs[-1], "as_cpu") else outs[-1]   # GPU or CPU list
    for s, shp in zip(sources, (np.array(shapes[i]) for i in range(len(sources)))):
        if (int(shp[0]), int(shp[1])) != (s.size[1], s.size[0]):
            raise CorruptImage(s.path, "image", f"decoded {tuple(int(v) for v in shp[:2])} (H, W), "
                               f"header says {s.size}")
    return [_to_torch(tl, device) for tl in outs[:-1]]


def render_batch(batch: dict, keys: list[str], device: torch.device | str) -> dict:
    """``batch`` with the :class:`~methods.augment.DeferredView` lists under ``keys`` replaced
    by their (N, 3, H, W) normalised float32 pixels on ``device`` (as
    ``methods.augment.render_views`` makes them for loader ``device``). Every method's views
    come a fixed number per image and name, so each image is decoded once; a batch that does
    not (views assembled by hand) is rendered name by name, one decode per view."""
    device = torch.device(device)
    for k in keys:
        sizes = {v.geom.out_size for v in batch[k]}
        if len(sizes) != 1:
            raise ValueError(f"dali loader: {k!r} holds views of several sizes ({sorted(sizes)})")
    plan = _slots(batch, keys)
    runs = ([plan] if plan is not None else
            [([v.source for v in batch[k]], [(k, list(range(len(batch[k]))))]) for k in keys])
    results = [(slots, _run(sources, slots, batch, device)) for sources, slots in runs]
    rendered: dict[str, torch.Tensor] = {}
    for (k, idx), x in ((slot, x) for slots, xs in results for slot, x in zip(slots, xs)):
        if k not in rendered:
            W, H = batch[k][0].geom.out_size
            rendered[k] = torch.empty((len(batch[k]), 3, H, W), dtype=torch.float32, device=device)
        rendered[k][torch.tensor(idx, device=device)] = x
    for k in keys:
        for i, v in enumerate(batch[k]):
            for y0, x0, h, w in v.cutout:
                rendered[k][i, :, y0:y0 + h, x0:x0 + w] = 0
    return {**batch, **rendered}
