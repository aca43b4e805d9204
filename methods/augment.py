"""Photometric augmentations with explicit numpy RNG (reproducible in any worker).

MoCo v2 "aug+" (Chen et al. 2020, Sec. 3): colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
grayscale p=0.2, Gaussian blur sigma in [0.1, 2.0] p=0.5. BYOL (Grill et al. 2020, Table 6)
views: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur p=1.0 / 0.1, solarize 0 / 0.2.

Every random parameter is drawn first (:meth:`Photometric.draw`, :func:`cutout_rect`) and
applied second, in one of two ways that draw identical parameters from the same rng:
- per sample on PIL images in a DataLoader worker (:meth:`Photometric.apply_pil`; loaders
  ``cpu`` and ``cpu_draft``), the torchvision pipeline of the official implementations;
- batched on float tensors on the training device (:func:`photometric_batch`; loader
  ``device``): a worker returns a :class:`DeferredView` (geometry + parameters) and
  :func:`render_views` makes the pixels after the batch reached the device.
:func:`render_view` is the one call a method's ``views`` makes per view; the type of
``record["image"]`` (array / lazily decoded / encoded bytes) picks the path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from methods.geometry import ViewGeometry

# recipe.loader: where a pretraining run decodes its images and applies the photometric
# augmentations (crops, flips and boxes always go through methods.geometry in the worker).
#   cpu        full-size PIL decode + PIL photometric in DataLoader workers (the default; the
#              official implementations' torchvision pipeline)
#   cpu_draft  as cpu, but a JPEG is decoded at 1/2, 1/4 or 1/8 size (DCT scaling) when every
#              view of the sample is downsampled at least that much anyway
#   device     workers read the file bytes and draw every random parameter; decode
#              (torchvision.io.decode_jpeg) and photometric run batched on the training device
#   dali       workers as for device (the same draws); decode, crops, photometric and
#              normalisation run in an NVIDIA DALI pipeline (benchmark/data/dali_loader.py;
#              GPU backend on CUDA, CPU backend otherwise)
LOADERS = ("cpu", "cpu_draft", "device", "dali")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)    # torchvision rgb_to_grayscale (ITU-R 601-2)
SOLARIZE_THRESHOLD = 128                 # ImageOps.solarize(img, 128)


@dataclass(frozen=True)
class PhotoParams:
    """One view's drawn photometric parameters. ``jitter``: (op, factor) in the order
    applied, op in ``JITTER_OPS``; ``blur_sigma`` 0 = no blur; ``gray_first``: the grayscale
    (if drawn) comes before the jitter (MoCo v1's torchvision pipeline)."""
    jitter: tuple[tuple[str, float], ...] = ()
    gray: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False
    gray_first: bool = False


@dataclass(frozen=True)
class Photometric:
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    gray_first: bool = False          # RandomGrayscale before ColorJitter (MoCo v1 official main_moco.py)
    jitter_style: str = "torchvision"  # | "tf": BYOL's offsets (official byol/utils/augmentations.py)

    def draw(self, rng: np.random.Generator) -> PhotoParams:
        jitter = (jitter_params(rng, *self.jitter, style=self.jitter_style)
                  if rng.random() < self.jitter_p else ())
        gray = bool(rng.random() < self.gray_p)
        sigma = float(rng.uniform(*self.blur_sigma)) if rng.random() < self.blur_p else 0.0
        return PhotoParams(jitter, gray, sigma, bool(rng.random() < self.solarize_p), self.gray_first)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return apply_pil(img, self.draw(rng))


MOCO_V2_AUG = Photometric()
BYOL_AUG_1 = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)
BYOL_AUG_2 = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)
# MoCo v1 (official main_moco.py without --aug-plus, InstDisc's): RandomGrayscale(0.2), then
# ColorJitter(0.4, 0.4, 0.4, 0.4) always; no blur
MOCO_V1_AUG = Photometric(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, blur_p=0.0, gray_first=True)

# jitter ops: torchvision's ColorJitter (factors) and, for jitter_style "tf", BYOL's official
# ones (byol/utils/augmentations.py: brightness + delta, contrast about each channel's mean,
# saturation scaled in HSV, each clipped to [0, 1]; its hue is torchvision's)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue", "brightness_add", "contrast_channel", "saturation_hsv")
JITTER_STYLES = ("torchvision", "tf")


def jitter_params(rng: np.random.Generator, brightness: float, contrast: float, saturation: float,
                  hue: float, style: str = "torchvision") -> tuple[tuple[str, float], ...]:
    """torchvision's ColorJitter semantics (factors in [1-s, 1+s], hue in [-h, h]), in a
    random order; an op of strength 0 is left out. ``style="tf"``: BYOL's ops, the brightness
    a delta in [-s, s] (official ``_random_brightness``), the others factors in [1-s, 1+s]."""
    if style not in JITTER_STYLES:
        raise ValueError(f"jitter_style: unknown {style!r} ({' | '.join(JITTER_STYLES)})")
    tf = style == "tf"
    ops = []
    for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if s and tf:
            lo, hi = (-s, s) if name == "brightness" else (1 - s, 1 + s)
            ops.append((_TF_NAMES[name], float(rng.uniform(lo, hi))))
        elif s:
            ops.append((name, float(rng.uniform(max(0, 1 - s), 1 + s))))
    if hue:
        ops.append(("hue", float(rng.uniform(-hue, hue))))
    return tuple(ops[i] for i in rng.permutation(len(ops)))


_TF_NAMES = {"brightness": "brightness_add", "contrast": "contrast_channel", "saturation": "saturation_hsv"}


def _pil_float_op(op: str):
    """A float-tensor jitter op (:func:`_jitter_op`) on a PIL image, rounded back to uint8."""
    def apply(img: Image.Image, f: float) -> Image.Image:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        y = _jitter_op(op, x, torch.full((1, 1, 1, 1), f))[0]
        return Image.fromarray((y.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return apply


_PIL_JITTER = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
               "saturation": TF.adjust_saturation, "hue": TF.adjust_hue,
               **{op: _pil_float_op(op) for op in _TF_NAMES.values()}}


def apply_pil(img: Image.Image, p: PhotoParams) -> Image.Image:
    if p.gray and p.gray_first:
        img = ImageOps.grayscale(img).convert("RGB")
    for op, f in p.jitter:
        img = _PIL_JITTER[op](img, f)
    if p.gray and not p.gray_first:
        img = ImageOps.grayscale(img).convert("RGB")
    if p.blur_sigma:
        # PIL's radius is the Gaussian's sigma (as in MoCo v2's GaussianBlur)
        img = img.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        img = ImageOps.solarize(img, SOLARIZE_THRESHOLD)
    return img


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 image -> float (3, H, W) normalised with the ImageNet mean and std; the
    same float operations as ``TF.normalize(TF.to_tensor(img))`` with one copy fewer."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return normalize_(t.float().div_(255))


def normalize_(t: torch.Tensor) -> torch.Tensor:
    """In place: (t - mean) / std over the channel dim (-3) of [0, 1] floats."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=t.dtype, device=t.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=t.dtype, device=t.device)[:, None, None]
    return t.sub_(mean).div_(std)


# -- cutout ------------------------------------------------------------------------------
CUTOUT_CLIPS = ("image", "box")


def cutout_box_rects(H: int, W: int, boxes: np.ndarray, rng: np.random.Generator, p: float = 0.5,
                     area: tuple[float, float] = (0.1, 0.3), clip: str = "image"
                     ) -> tuple[tuple[int, int, int, int], ...]:
    """The (y, x, h, w) rectangles SoCo's per-box cutout erases in an H x W view (official
    ``RandomCutoutInBbox``, contrast/data/transform_ops.py; tools/SoCo_FPN_100ep.sh: p 0.5,
    area 0.1-0.3; not in the paper). For each xyxy box (view pixels), with probability ``p``:

    - ``clip="image"`` (official): side s = round(sqrt(u * box area)), u ~ U(area); a centre
      pixel drawn uniformly among the box's pixels; the pixels within s // 2 of it erased
      (a (2 (s // 2) + 1)-px square, its ends inclusive), clipped to the image only, so it
      may spill past the box. The official code draws the centre with ``random.randint`` on
      the float corners its dataset passes, which raises; this is the draw it evidently means
      (whole pixels, the box's pixel count as its area).
    - ``clip="box"``: a square of side s centred at a uniform point of the box, clipped to
      the box: the erased pixels always belong to the object they occlude."""
    if clip not in CUTOUT_CLIPS:
        raise ValueError(f"cutout clip: unknown {clip!r} ({' | '.join(CUTOUT_CLIPS)})")
    rects = []
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        if rng.random() >= p:
            continue
        box_area = max(x2 - x1, 0) * max(y2 - y1, 0)
        if clip == "image":
            side = int(round(math.sqrt(rng.uniform(*area) * box_area)))
            # the pixels the box covers (and the image holds)
            lo_x, lo_y = min(max(math.floor(x1), 0), W - 1), min(max(math.floor(y1), 0), H - 1)
            hi_x = max(min(math.ceil(x2) - 1, W - 1), lo_x)
            hi_y = max(min(math.ceil(y2) - 1, H - 1), lo_y)
            cx, cy = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
            a, b = max(cx - side // 2, 0), min(cx + side // 2, W - 1)
            c, d = max(cy - side // 2, 0), min(cy + side // 2, H - 1)
            rects.append((c, a, d - c + 1, b - a + 1))
            continue
        side = np.sqrt(rng.uniform(*area) * box_area)
        cx, cy = rng.uniform(x1, x2), rng.uniform(y1, y2)
        # whole pixels inside the box (and the image)
        lo_x, hi_x = max(int(np.ceil(x1)), 0), min(int(np.floor(x2)), W)
        lo_y, hi_y = max(int(np.ceil(y1)), 0), min(int(np.floor(y2)), H)
        a, b = max(int(round(cx - side / 2)), lo_x), min(int(round(cx + side / 2)), hi_x)
        c, d = max(int(round(cy - side / 2)), lo_y), min(int(round(cy + side / 2)), hi_y)
        if a < b and c < d:
            rects.append((c, a, d - c, b - a))
    return tuple(rects)


def cutout_in_boxes(t: "torch.Tensor | DeferredView", boxes: np.ndarray, rng: np.random.Generator,
                    p: float = 0.5, area: tuple[float, float] = (0.1, 0.3), clip: str = "image"):
    """Erase :func:`cutout_box_rects` (value 0 = the mean colour after normalisation) in a
    view tensor; a deferred view (loader ``device``) records the rectangles instead."""
    if isinstance(t, DeferredView):
        W, H = t.geom.out_size
        return replace(t, cutout=cutout_box_rects(H, W, boxes, rng, p, area, clip))
    rects = cutout_box_rects(t.shape[-2], t.shape[-1], boxes, rng, p, area, clip)
    if not rects:
        return t
    t = t.clone()
    for y, x, h, w in rects:
        t[..., y:y + h, x:x + w] = 0
    return t


# -- one view: the call a method's views() makes ----------------------------------------
@dataclass(frozen=True)
class DeferredView:
    """A view whose pixels are made on the training device: the encoded source (has
    ``data`` bytes and ``size``), the geometry and every drawn parameter."""
    source: Any
    geom: ViewGeometry
    photo: PhotoParams
    cutout: tuple[tuple[int, int, int, int], ...] = ()   # (y, x, h, w) squares to erase


def as_image(image: Any) -> Any:
    """``record["image"]`` ready for :func:`render_view`: an array becomes a PIL image (once
    per sample); lazily decoded and encoded images pass through. All have ``.size``."""
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


def draft_reduction(geom: ViewGeometry) -> int:
    """The largest JPEG DCT scale 1/r (r in 1, 2, 4, 8) at which the source still has a pixel
    for every view pixel."""
    m = geom.max_reduction()
    return next((r for r in (8, 4, 2) if r <= m + 1e-9), 1)


def decode_for(image: Any, geoms) -> None:
    """Decode a lazily decoded image once, at the finest DCT scale any of ``geoms`` needs
    (a method that draws all its geometries first calls it before rendering them; without
    it a later, larger view re-decodes). Other images: nothing to do."""
    if hasattr(image, "pixels"):
        image.pixels(min(draft_reduction(g) for g in geoms))


def render_view(image: Any, geom: ViewGeometry, aug: Photometric, rng: np.random.Generator):
    """``to_tensor(aug(geom.apply_image(image), rng))`` for a PIL image; for a lazily decoded
    one (``pixels(r)``), the same from the smallest DCT-scaled decode that serves ``geom``;
    for an encoded one (``data``), a :class:`DeferredView` with the same drawn parameters."""
    if hasattr(image, "data"):
        return DeferredView(image, geom, aug.draw(rng))
    if hasattr(image, "pixels"):
        img, r = image.pixels(draft_reduction(geom))
        return to_tensor(aug(geom.on_reduced_source(r).apply_image(img), rng))
    return to_tensor(aug(geom.apply_image(image), rng))


# -- batched on tensors (loader "device") -------------------------------------------------
def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _rgb2hsv(x: torch.Tensor) -> torch.Tensor:
    # torchvision transforms/_functional_tensor.py _rgb2hsv, on (..., 3, H, W)
    r, g, b = x.unbind(-3)
    maxc, minc = x.max(-3).values, x.min(-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), -3)


def _hsv2rgb(x: torch.Tensor) -> torch.Tensor:
    # the closed form of the piecewise HSV -> RGB (torchvision's _hsv2rgb) without its
    # (6 x 3)-way selection: channel n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    h, s, v = x.unbind(-3)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = torch.remainder(n + 6 * h.unsqueeze(-3), 6)
    return v.unsqueeze(-3) * (1 - s.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp(0, 1))


def _jitter_op(op: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's float-tensor adjust_<op> with a per-sample factor f (n, 1, 1, 1); the
    ``_TF_NAMES`` ops as BYOL's official augmentations.py computes them, clipped to [0, 1]."""
    if op == "brightness_add":
        return (x + f).clamp(0, 1)
    if op == "contrast_channel":
        m = x.mean((-2, -1), keepdim=True)
        return (f * (x - m) + m).clamp(0, 1)
    if op == "saturation_hsv":
        hsv = _rgb2hsv(x)
        s = (hsv[:, 1] * f[:, 0]).clamp(0, 1)
        return _hsv2rgb(torch.stack((hsv[:, 0], s, hsv[:, 2]), 1)).clamp(0, 1)
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), f)
    if op == "contrast":
        return _blend(x, _gray(x).mean((-3, -2, -1), keepdim=True), f)
    if op == "saturation":
        return _blend(x, _gray(x), f)
    hsv = _rgb2hsv(x)
    h = torch.remainder(hsv[:, 0] + f[:, 0], 1.0)
    return _hsv2rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def _gaussian_kernels(sigmas: torch.Tensor, size: int) -> torch.Tensor:
    # torchvision _get_gaussian_kernel1d, zero-padded to a common odd size
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size, device=sigmas.device)
    pdf = torch.exp(-0.5 * (x[None] / sigmas[:, None]) ** 2)
    k = pdf * ((x[None].abs() <= torch.ceil(3 * sigmas[:, None]) + 1e-6))
    return k / k.sum(1, keepdim=True)


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-3 sigma (torchvision's GaussianBlur needs one; PIL's
    radius-sigma blur has none)."""
    return 2 * math.ceil(3 * sigma) + 1


def photometric_batch(x: torch.Tensor, params: list[PhotoParams]) -> torch.Tensor:
    """Apply each sample's parameters to float images ``x`` (N, 3, H, W) in [0, 1], batched:
    jitter ops position by position (each sample keeps its own order), grayscale (before the
    jitter where ``gray_first``), Gaussian
    blur (per-sample sigma, kernel ``blur_kernel_size``, reflect padding, as torchvision's
    ``gaussian_blur``), solarize at 128/255. Equals torchvision's tensor functional ops run
    sample by sample (tested)."""
    n = x.shape[0]
    dev = x.device
    x = x.clone()
    if any(p.gray and p.gray_first for p in params):   # grayscale before the jitter (MoCo v1)
        first = torch.tensor([p.gray and p.gray_first for p in params], device=dev).view(n, 1, 1, 1)
        x = torch.where(first, _gray(x).expand_as(x), x)
    for pos in range(max((len(p.jitter) for p in params), default=0)):
        for op in JITTER_OPS:
            idx = [i for i, p in enumerate(params) if len(p.jitter) > pos and p.jitter[pos][0] == op]
            if idx:
                f = torch.tensor([params[i].jitter[pos][1] for i in idx], dtype=x.dtype, device=dev)
                sel = torch.tensor(idx, device=dev)
                x.index_copy_(0, sel, _jitter_op(op, x[sel], f.view(-1, 1, 1, 1)))
    gray = torch.tensor([p.gray and not p.gray_first for p in params], device=dev).view(n, 1, 1, 1)
    x = torch.where(gray, _gray(x).expand_as(x), x)
    idx = [i for i, p in enumerate(params) if p.blur_sigma > 0]
    if idx:
        sig = torch.tensor([params[i].blur_sigma for i in idx], dtype=x.dtype, device=dev)
        size = max(blur_kernel_size(params[i].blur_sigma) for i in idx)
        k = _gaussian_kernels(sig, size).repeat_interleave(3, 0)            # (m*3, size)
        sel = torch.tensor(idx, device=dev)
        y = x[sel].reshape(1, -1, *x.shape[-2:])
        pad = size // 2
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=k.shape[0])
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=k.shape[0])
        x.index_copy_(0, sel, y.reshape(len(idx), 3, *x.shape[-2:]))
    sol = torch.tensor([p.solarize for p in params], device=dev).view(n, 1, 1, 1)
    return torch.where(sol & (x >= SOLARIZE_THRESHOLD / 255), 1 - x, x)


def render_views(views: list[DeferredView], decoded: dict[Any, torch.Tensor]) -> torch.Tensor:
    """The (N, 3, H, W) normalised batch of one view name: crop/resize/flip each sample from
    its decoded source through its geometry (``ViewGeometry.apply_tensor``), then photometric
    batched, normalisation and cutout. ``decoded``: source -> uint8 (3, H, W) tensor."""
    x = torch.stack([v.geom.apply_tensor(decoded[v.source]) for v in views]).div_(255)
    x = normalize_(photometric_batch(x, [v.photo for v in views]))
    for i, v in enumerate(views):
        for y0, x0, h, w in v.cutout:
            x[i, :, y0:y0 + h, x0:x0 + w] = 0
    return x
