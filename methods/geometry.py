"""The one geometry layer: every crop, resize and flip applied to a view's pixels is applied
by the same object to its boxes and coordinates, so boxes (SoCo), pixel correspondences
(PixPro) and pseudo boxes (AlignDet) always follow their pixels.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1), so
its centre is (j + 0.5, i + 0.5). A view maps the source rectangle ``crop`` (x0, y0, x1, y1)
onto ``out_size`` (W, H) pixels, then optionally mirrors it horizontally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:   # torch is imported where tensors are made (the worker-side geometry needs none)
    import torch

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ViewGeometry:
    crop: Box                       # source rectangle x0, y0, x1, y1
    out_size: tuple[int, int]       # view width, height
    flip: bool = False

    @property
    def scale(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.crop
        return self.out_size[0] / (x1 - x0), self.out_size[1] / (y1 - y0)

    # -- points -----------------------------------------------------------------
    def map_points(self, pts: np.ndarray) -> np.ndarray:
        """Source (x, y) -> view (x, y)."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        sx, sy = self.scale
        out = np.empty_like(pts)
        out[:, 0] = (pts[:, 0] - self.crop[0]) * sx
        out[:, 1] = (pts[:, 1] - self.crop[1]) * sy
        if self.flip:
            out[:, 0] = self.out_size[0] - out[:, 0]
        return out

    def unmap_points(self, pts: np.ndarray) -> np.ndarray:
        """View (x, y) -> source (x, y)."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2).copy()
        if self.flip:
            pts[:, 0] = self.out_size[0] - pts[:, 0]
        sx, sy = self.scale
        pts[:, 0] = pts[:, 0] / sx + self.crop[0]
        pts[:, 1] = pts[:, 1] / sy + self.crop[1]
        return pts

    def grid_points(self, grid_w: int, grid_h: int) -> np.ndarray:
        """Source coordinates of the centres of a (grid_h, grid_w) feature map laid over the
        view (PixPro's pixel positions). Returns (grid_h, grid_w, 2)."""
        xs = (np.arange(grid_w) + 0.5) * self.out_size[0] / grid_w
        ys = (np.arange(grid_h) + 0.5) * self.out_size[1] / grid_h
        g = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        return self.unmap_points(g).reshape(grid_h, grid_w, 2)

    def bin_size(self, grid_w: int, grid_h: int) -> tuple[float, float]:
        """Source width and height of one bin of a (grid_h, grid_w) feature map over the view."""
        x0, y0, x1, y1 = self.crop
        return (x1 - x0) / grid_w, (y1 - y0) / grid_h

    # -- boxes ------------------------------------------------------------------
    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Source xyxy boxes -> view xyxy boxes (unclipped)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        a = self.map_points(boxes[:, :2])
        b = self.map_points(boxes[:, 2:])
        return np.concatenate([np.minimum(a, b), np.maximum(a, b)], 1)

    def boxes_in_view(self, boxes: np.ndarray, min_visible: float = 0.5,
                      min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Map, clip to the view and keep boxes whose visible part is at least
        ``min_visible`` of their area and ``min_size`` px wide and high. Returns (clipped
        boxes of the kept, keep mask over the input)."""
        m = self.map_boxes(boxes)
        W, H = self.out_size
        c = m.copy()
        c[:, [0, 2]] = c[:, [0, 2]].clip(0, W)
        c[:, [1, 3]] = c[:, [1, 3]].clip(0, H)
        area = (m[:, 2] - m[:, 0]) * (m[:, 3] - m[:, 1])
        w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
        keep = (w >= min_size) & (h >= min_size) & (w * h >= min_visible * np.maximum(area, 1e-12))
        return c[keep], keep

    # -- pixels -----------------------------------------------------------------
    def apply_image(self, img: np.ndarray | Image.Image,
                    resample: int = Image.BILINEAR) -> Image.Image:
        pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
        out = pil.resize(self.out_size, resample=resample, box=tuple(float(v) for v in self.crop))
        if self.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return out

    def apply_tensor(self, img: "torch.Tensor") -> "torch.Tensor":
        """The view of a (C, H, W) image tensor (any device), as float in the input's range:
        the same bilinear resampling as :meth:`apply_image` (PIL's separable triangle filter
        widened by the downscale factor, over the same ``crop`` box), computed as two
        matrix products without PIL's uint8 rounding between the passes."""
        _, H, W = img.shape
        wx = resample_weights(self.crop[0], self.crop[2], W, self.out_size[0], img.device)
        wy = resample_weights(self.crop[1], self.crop[3], H, self.out_size[1], img.device)
        if self.flip:
            wx = wx.flip(0)
        (x0, x1), (y0, y1) = _support(wx), _support(wy)     # only the source pixels used
        x = img[:, y0:y1, x0:x1].float()
        return (wy[:, y0:y1] @ x) @ wx[:, x0:x1].T

    def max_reduction(self) -> float:
        """How many times the view shrinks its crop in its less shrunk direction: a source
        decoded at 1/r size (r <= this) still has a pixel for every view pixel."""
        sx, sy = self.scale
        return 1.0 / max(sx, sy)

    def on_reduced_source(self, r: int) -> "ViewGeometry":
        """The same view read from the source decoded at 1/r size (JPEG DCT scaling maps x to
        x / r): the crop in the reduced image's coordinates. Boxes keep using ``self``: both
        give the same view coordinates."""
        return replace(self, crop=tuple(v / r for v in self.crop)) if r != 1 else self

    def resized(self, out_size: tuple[int, int]) -> "ViewGeometry":
        """The same view at another resolution (SoCo's V3 derived from V2)."""
        return replace(self, out_size=tuple(out_size))


def resample_weights(in0: float, in1: float, in_size: int, out_size: int, device=None) -> "torch.Tensor":
    """(out_size, in_size) weights of PIL's bilinear resampling of source interval
    [in0, in1) onto ``out_size`` pixels (Pillow ``Resample.c`` ``precompute_coeffs``: a
    triangle filter whose support grows with the downscale factor, window rounded as PIL
    rounds it, weights normalised per output pixel)."""
    import torch
    scale = (in1 - in0) / out_size
    fs = max(scale, 1.0)
    support = 1.0 * fs
    centre = in0 + (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale
    lo = torch.trunc(centre - support + 0.5).clamp(min=0)[:, None]
    hi = torch.trunc(centre + support + 0.5).clamp(max=in_size)[:, None]
    x = torch.arange(in_size, dtype=torch.float64, device=device)[None, :]
    w = (1 - ((x - centre[:, None] + 0.5) / fs).abs()).clamp(min=0) * ((x >= lo) & (x < hi))
    w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
    return w.float()


def _support(w: "torch.Tensor") -> tuple[int, int]:
    nz = (w != 0).any(0).nonzero()
    return int(nz[0]), int(nz[-1]) + 1


def grid_matches(a: ViewGeometry, b: ViewGeometry, grid: tuple[int, int],
                 threshold: float = 0.7) -> np.ndarray:
    """PixPro's positive pixel pairs (Xie et al. 2021, Sec. 3.1): bin i of view ``a``'s
    (grid_h, grid_w) = ``grid[::-1]`` feature map and bin j of view ``b``'s are positives when
    the distance between their centres in source image coordinates, divided by the larger of
    the two views' bin diagonals, is below ``threshold``. Returns (Li, Lj) bool, bins in
    row-major order (as ``feature.flatten(2)``)."""
    gw, gh = grid
    pa = a.grid_points(gw, gh).reshape(-1, 2)
    pb = b.grid_points(gw, gh).reshape(-1, 2)
    diag = max(math.hypot(*a.bin_size(gw, gh)), math.hypot(*b.bin_size(gw, gh)))
    dist = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return dist / diag < threshold


def random_resized_crop(width: int, height: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A crop box with area fraction in ``scale`` and aspect ratio in ``ratio`` (log-uniform),
    as torchvision's RandomResizedCrop draws it; falls back to a centre crop."""
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        a = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(a * r)))
        h = int(round(math.sqrt(a / r)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return (x0, y0, x0 + w, y0 + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return (x0, y0, x0 + w, y0 + h)


def random_view(width: int, height: int, out_size: int | tuple[int, int], rng: np.random.Generator,
                scale: tuple[float, float] = (0.08, 1.0), flip_prob: float = 0.5,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> ViewGeometry:
    """Random resized crop + horizontal flip, the view of MoCo/BYOL/SoCo/PixPro."""
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    crop = random_resized_crop(width, height, rng, scale, ratio)
    return ViewGeometry(crop, tuple(out_size), bool(rng.random() < flip_prob))


def whole_view(width: int, height: int, out_size: int | tuple[int, int],
               flip: bool = False) -> ViewGeometry:
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    return ViewGeometry((0, 0, width, height), tuple(out_size), flip)


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, ratio: float = 0.1,
                 prob: float = 0.5) -> np.ndarray:
    """SoCo's box jitter (Sec. 3.3): with probability ``prob`` per box, x, y, w, h each move
    by r*w or r*h with r ~ U[-ratio, ratio]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if len(boxes) == 0:
        return boxes
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    r = rng.uniform(-ratio, ratio, size=(len(boxes), 4))
    on = rng.random(len(boxes)) < prob
    r[~on] = 0
    cx, cy = cx + r[:, 0] * w, cy + r[:, 1] * h
    w2, h2 = w * (1 + r[:, 2]), h * (1 + r[:, 3])
    return np.stack([cx - w2 / 2, cy - h2 / 2, cx + w2 / 2, cy + h2 / 2], 1)


def multi_crop_views(width: int, height: int, rng: np.random.Generator, sizes, counts, scales,
                     flip_prob: float = 0.5) -> list[list[ViewGeometry]]:
    """SwAV's multi-crop (Caron et al. 2020, Sec. 3.2; official facebookresearch/swav
    ``src/multicropdataset.py``): for each resolution group i, ``counts[i]`` random resized
    crops of side ``sizes[i]`` whose area fraction lies in ``scales[i]`` = (min, max), each
    flipped with ``flip_prob``. Returns the geometries grouped by resolution, in crop order
    (2x224 at (0.14, 1) then 6x96 at (0.05, 0.14) for the official 400-epoch model)."""
    if not len(sizes) == len(counts) == len(scales):
        raise ValueError(f"multi_crop_views: {len(sizes)} sizes, {len(counts)} counts, {len(scales)} scales")
    return [[random_view(width, height, int(s), rng, scale=tuple(sc), flip_prob=flip_prob) for _ in range(n)]
            for s, n, sc in zip(sizes, counts, scales)]


# -- label maps (DetCon's segmentation masks) --------------------------------------------
def _centre_source_index(n_out: int, lo: float, hi: float, src: int, img: int, flip: bool) -> np.ndarray:
    """floor of the source coordinate of each of ``n_out`` view pixel centres over [lo, hi)
    of an image axis ``img`` long, in a map ``src`` long: floor(((k + 1/2)(hi - lo)/n_out + lo)
    src/img). Exact in integers when the window is (every crop the methods draw), so a centre
    that falls on a pixel edge takes the pixel after it; floats otherwise."""
    k = np.arange(n_out, dtype=np.int64)
    if flip:
        k = k[::-1]   # view column k shows resized column n_out-1-k
    if float(lo).is_integer() and float(hi).is_integer():
        lo_i, hi_i = int(lo), int(hi)
        idx = ((2 * k + 1) * (hi_i - lo_i) + 2 * n_out * lo_i) * src // (2 * n_out * img)
    else:
        idx = np.floor(((k + 0.5) * ((hi - lo) / n_out) + lo) * (src / img)).astype(np.int64)
    return np.clip(idx, 0, src - 1)


def mask_source_pixels(geom: ViewGeometry, mask_size: tuple[int, int],
                       image_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each view column and row, the column and row of the source label map (``mask_size``
    = (W, H)) that the view pixel's centre falls in: the centres unmapped to the source as
    :meth:`ViewGeometry.unmap_points` maps them, then floored (nearest-neighbour resampling;
    PIL's ``NEAREST`` resize and TF's ``NEAREST_NEIGHBOR`` with half-pixel centres pick the
    same pixels except where a centre falls exactly on a pixel edge, where float rounding
    decides theirs). ``image_size`` (W, H): the image the geometry was drawn on, when the map
    is stored at another resolution (its coordinates are scaled). Returns (cols (out_W,),
    rows (out_H,)) int64 within the map."""
    mw, mh = mask_size
    iw, ih = image_size if image_size is not None else mask_size
    (x0, y0, x1, y1), (W, H) = geom.crop, geom.out_size
    return (_centre_source_index(W, x0, x1, mw, iw, geom.flip),
            _centre_source_index(H, y0, y1, mh, ih, False))


def apply_mask(mask: np.ndarray, geom: ViewGeometry, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The view of a label map (H x W ids, one per source pixel): the same crop, resize and
    flip as the view's pixels, resampled nearest-neighbour so ids stay ids (DetCon official
    utils/tf_image_ops.py: its masks are cropped with the image's window, flipped with its coin
    and resized with NEAREST_NEIGHBOR). Equals ``geom.apply_image(mask, Image.NEAREST)``;
    ``image_size`` as in :func:`mask_source_pixels`. Returns (out_H, out_W), the mask's dtype."""
    mask = np.asarray(mask)
    cols, rows = mask_source_pixels(geom, (mask.shape[1], mask.shape[0]), image_size)
    return mask[rows[:, None], cols[None, :]]


# -- the same mappings on tensors (ReSim's windows, on the device inside a step) ---------------
def geometry_tensor(g: ViewGeometry) -> torch.Tensor:
    """A view's geometry as a (7,) float tensor (crop x0, y0, x1, y1, out W, out H, flip),
    for the device-side mapping of :func:`map_view_boxes`."""
    import torch
    return torch.tensor([*g.crop, *g.out_size, float(g.flip)], dtype=torch.float32)


def _unmap_xy(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View -> source (``ViewGeometry.unmap_points``); ``g`` (..., 7) broadcast over x, y."""
    import torch
    x = torch.where(g[..., 6] > 0.5, g[..., 4] - x, x)
    return (x * (g[..., 2] - g[..., 0]) / g[..., 4] + g[..., 0],
            y * (g[..., 3] - g[..., 1]) / g[..., 5] + g[..., 1])


def _map_xy(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source -> view (``ViewGeometry.map_points``)."""
    import torch
    x = (x - g[..., 0]) * g[..., 4] / (g[..., 2] - g[..., 0])
    y = (y - g[..., 1]) * g[..., 5] / (g[..., 3] - g[..., 1])
    return torch.where(g[..., 6] > 0.5, g[..., 4] - x, x), y


def map_view_boxes(boxes: torch.Tensor, g_from: torch.Tensor, g_to: torch.Tensor) -> torch.Tensor:
    """xyxy ``boxes`` (K, 4) in the pixels of view ``g_from`` (N, 7) -> (N, K, 4) in the pixels
    of view ``g_to`` (N, 7), through the source image: the tensor form of
    ``g_to.map_boxes(g_from.unmap_points(...))``, flips included (official anchor_mapping,
    datasets.py:132-158, which needs none: its one flip precedes both crops)."""
    import torch
    gf, gt = g_from[:, None, :], g_to[:, None, :]
    b = boxes.to(g_from.dtype)[None]
    xa, ya = _map_xy(*_unmap_xy(b[..., 0], b[..., 1], gf), gt)
    xb, yb = _map_xy(*_unmap_xy(b[..., 2], b[..., 3], gf), gt)
    return torch.stack([torch.minimum(xa, xb), torch.minimum(ya, yb),
                        torch.maximum(xa, xb), torch.maximum(ya, yb)], -1)


def window_grid(size: float, stride: float, count: int) -> torch.Tensor:
    """(count^2, 4) xyxy windows of side ``size`` at ``stride`` from the view's corner,
    row-major (official datasets.py:76-96: rows i, columns j, y0 = i stride, x0 = j stride)."""
    import torch
    t = torch.arange(count, dtype=torch.float32) * stride
    y0, x0 = torch.meshgrid(t, t, indexing="ij")
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    return torch.stack([x0, y0, x0 + size, y0 + size], 1)


def align_windows(windows: torch.Tensor, g_q: torch.Tensor, g_k: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows on view q mapped into view k: ((N, K, 4) boxes in k's pixels, (N, K) valid).
    A window is valid when its mapped box lies in view k with x0, y0 >= 0 and x1 < W, y1 < H
    (strict on the far side: datasets.py:156); an invalid one gets the dummy box (0, 0, 1, 1)
    (datasets.py:88-90). All on the device, no host sync."""
    import torch
    boxes = map_view_boxes(windows, g_q, g_k)
    W, H = g_k[:, None, 4], g_k[:, None, 5]
    valid = (boxes[..., 0] >= 0) & (boxes[..., 1] >= 0) & (boxes[..., 2] < W) & (boxes[..., 3] < H)
    dummy = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    return torch.where(valid[..., None], boxes, dummy), valid
