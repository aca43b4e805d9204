"""recipe.loader=dali (benchmark/data/dali_loader.py) on DALI's CPU backend: the same draws
as ``device`` and ``cpu``, boxes unchanged, pixels of the exact crop windows (a marker test),
flips, output shapes, close to PIL and equal to the ``device`` path, one pipeline reused, an
end-to-end step of MoCo v2 and SoCo, and the errors."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("nvidia.dali")

from benchmark.data import dali_loader as D                                  # noqa: E402
from benchmark.data.errors import CorruptImage                               # noqa: E402
from benchmark.data.images import ImageSource, render_deferred               # noqa: E402
from benchmark.data.io import EncodedImage                                   # noqa: E402
from benchmark.experiments.config import pretrain_config                     # noqa: E402
from methods import augment as A                                             # noqa: E402
from methods import build_method                                             # noqa: E402
from methods.config import ConfigError                                       # noqa: E402
from methods.geometry import ViewGeometry                                    # noqa: E402

SOCO_SMALL = {"proposal_source": "random", "view_size": 64, "v3_size": 32, "fpn_channels": 16,
              "head_conv_dim": 16, "head_fc_dim": 32, "proj_hidden_dim": 32, "proj_dim": 16,
              "pred_hidden_dim": 32, "backbone": "resnet18"}
NO_BLUR = A.Photometric(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0, gray_p=0.3, blur_p=0.0, solarize_p=0.3)
ALL_ON = A.Photometric(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0, gray_p=0.4, blur_p=0.5, solarize_p=0.4)
STD = torch.tensor(A.IMAGENET_STD)[:, None, None]
MEAN = torch.tensor(A.IMAGENET_MEAN)[:, None, None]


def _smooth(w: int, h: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC))


def _levels(t: torch.Tensor) -> torch.Tensor:
    """Normalised pixels back to grey levels (0..255)."""
    return (t * STD + MEAN) * 255


@pytest.fixture
def jpegs(tmp_path):
    for i in range(3):
        Image.fromarray(_smooth(320, 240, i)).save(tmp_path / f"{i}.jpg", quality=92)
    return ImageSource.from_folder(tmp_path)


def _views(source, loader, m, n=None):
    source.loader = loader
    return [m.views(source.record(i), np.random.default_rng(i)) for i in range(n or len(source))]


# -- parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,cfg", [("moco_v2", {"crop_size": 64}), ("soco", SOCO_SMALL)])
def test_dali_draws_what_device_and_cpu_draw(name, cfg, jpegs, monkeypatch):
    drawn: list = []
    orig = A.Photometric.draw
    monkeypatch.setattr(A.Photometric, "draw", lambda self, rng: drawn.append(orig(self, rng)) or drawn[-1])
    m = build_method(name, **cfg)
    got = {}
    for loader in ("cpu", "device", "dali"):
        jpegs.loader = loader
        drawn.clear()
        rng = np.random.default_rng(11)
        sample = m.views(jpegs.record(2), rng)
        got[loader] = (list(drawn), rng.random(), sample)
    assert len(got["cpu"][0]) >= 2 and got["cpu"][0] == got["device"][0] == got["dali"][0]
    assert got["cpu"][1] == got["device"][1] == got["dali"][1]          # rng streams in step
    dev = {k: v for k, v in got["device"][2].items() if isinstance(v, A.DeferredView)}
    dali = {k: v for k, v in got["dali"][2].items() if isinstance(v, A.DeferredView)}
    assert dev.keys() == dali.keys() and len(dali) >= 2
    for k in dali:
        assert isinstance(dali[k].source, D.DaliImage)
        assert (dali[k].geom, dali[k].photo, dali[k].cutout) == (dev[k].geom, dev[k].photo, dev[k].cutout)


def test_view_params_encode_the_drawn_order():
    p = A.PhotoParams(jitter=(("hue", 0.05), ("contrast", 0.7), ("brightness", 1.2), ("saturation", 0.6)),
                      gray=True, blur_sigma=1.3, solarize=True)
    v = A.DeferredView(None, ViewGeometry((1.5, 2, 101, 82), (32, 24), True), p)
    d, arg, iarg = D.view_params(v)
    assert d[:16].tolist() == pytest.approx([1, 0, 0, 0.05, 0.7, 0, 0.3, 0, 1.2, 0, 0, 0, 0.6, 0.4, 0, 0])
    assert d[16:].tolist() == [0, 1, 1]                   # gray after the jitter, solarize
    assert arg.tolist() == pytest.approx([2, 1.5, 82, 101, 1.3])     # roi (y0, x0, y1, x1), sigma
    assert iarg.tolist() == [1, A.blur_kernel_size(1.3)]
    with pytest.raises(ValueError, match="brightness_add.*device"):
        D.view_params(A.DeferredView(None, v.geom, A.PhotoParams(jitter=(("brightness_add", 0.1),))))


# -- pixels ---------------------------------------------------------------------------------
def test_pixels_equal_the_device_path_for_every_op(jpegs):
    """Same decode (libjpeg on CPU), same resampling, the same float ops: for a window whose
    filter taps stay inside the image, DALI's pixels equal loader device's up to float
    rounding (tolerance 0.01 grey levels; measured 1e-4)."""
    rng = np.random.default_rng(0)
    params = [ALL_ON.draw(rng) for _ in range(12)][4:]
    assert {p.gray for p in params} == {True, False} and {p.blur_sigma > 0 for p in params} == {True, False}
    assert {p.solarize for p in params} == {True, False}
    geoms = [ViewGeometry((13.5, 20, 213, 170), (64, 48), bool(i % 2)) for i in range(8)]
    dali_src = [D.DaliImage(p) for p in jpegs.paths]
    enc_src = [EncodedImage(p) for p in jpegs.paths]
    x = render_deferred({"v": [A.DeferredView(dali_src[i % 3], g, p) for i, (g, p) in enumerate(zip(geoms, params))]},
                        "cpu")["v"]
    y = render_deferred({"v": [A.DeferredView(enc_src[i % 3], g, p) for i, (g, p) in enumerate(zip(geoms, params))]},
                        "cpu")["v"]
    assert x.shape == y.shape == (8, 3, 48, 64) and x.dtype == y.dtype == torch.float32
    assert (_levels(x) - _levels(y)).abs().max() < 0.01
    # every view changed by its photometric draws (the parameters are applied)
    plain = render_deferred({"v": [A.DeferredView(dali_src[i % 3], g, A.PhotoParams()) for i, g in enumerate(geoms)]},
                            "cpu")["v"]
    assert ((_levels(x) - _levels(plain)).abs().mean((1, 2, 3)) > 1).all()


def test_pixels_close_to_the_cpu_loader(jpegs):
    """PIL (loader cpu) resamples in uint8 with a rounding between its passes and rounds
    after every photometric op; DALI does both in float. Blur left out (PIL's is a box
    approximation of the Gaussian). Tolerance: 2.5 grey levels on average, 8 at the 99th
    percentile (the device path's against PIL, tests/test_loader_paths.py: 1.6 measured)."""
    rng = np.random.default_rng(1)
    geoms = [ViewGeometry((13, 20, 213, 170), (64, 48), True), ViewGeometry((40.5, 7, 300, 230), (56, 56)),
             ViewGeometry((100, 50, 140, 90), (48, 48))]                                 # upsampling
    views, ref = [], []
    for i, g in enumerate(geoms * 2):
        p = NO_BLUR.draw(rng)
        img = Image.open(jpegs.paths[i % 3]).convert("RGB")
        ref.append(A.to_tensor(A.apply_pil(g.apply_image(img), p)))
        views.append(A.DeferredView(D.DaliImage(jpegs.paths[i % 3]), g, p))
    for g in geoms:
        idx = [i for i, v in enumerate(views) if v.geom == g]
        out = render_deferred({"v": [views[i] for i in idx]}, "cpu")["v"]
        diff = (_levels(out) - _levels(torch.stack([ref[i] for i in idx]))).abs()
        assert diff.mean() < 2.5, diff.mean()
        assert np.percentile(diff.numpy(), 99) < 8


def test_window_at_the_image_border(jpegs):
    """Where a view's filter taps reach past the image (a window at its border), DALI
    extends the image by its edge pixels and PIL / ``apply_tensor`` drop those taps and
    renormalise: the outer pixels differ by a few grey levels, the rest is equal."""
    src = D.DaliImage(jpegs.paths[1])
    g = ViewGeometry((0, 0, 320, 240), (64, 48))                    # 5x down: taps 5 px wide
    x = _levels(render_deferred({"v": [A.DeferredView(src, g, A.PhotoParams())]}, "cpu")["v"][0])
    y = _levels(render_deferred({"v": [A.DeferredView(EncodedImage(jpegs.paths[1]), g, A.PhotoParams())]},
                                "cpu")["v"][0])
    d = (x - y).abs()
    assert d[:, 3:-3, 3:-3].max() < 0.01
    assert 0.1 < d.max() < 8 and d.mean() < 0.5


def _marker(path, size=(400, 300), box=(150, 90, 190, 130)):
    img = Image.new("RGB", size, (20, 20, 20))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(250, 250, 250))
    img.save(path)                                   # PNG: exact pixels
    return np.array(box, dtype=float)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_window_is_exactly_the_drawn_one(tmp_path, flip):
    """A bright square in a dark image: it lands where the geometry maps it; the same window
    moved by 3 px would put it elsewhere (and the pixels match the true window to 1 level)."""
    box = _marker(tmp_path / "m.png")
    src = D.DaliImage(str(tmp_path / "m.png"))
    g = ViewGeometry((100, 50, 260, 170), (80, 60), flip)      # 2x downscale: the square at 25..45, 20..40
    out = _levels(render_deferred({"v": [A.DeferredView(src, g, A.PhotoParams())]}, "cpu")["v"][0])
    img = torch.from_numpy(np.array(Image.open(tmp_path / "m.png"))).permute(2, 0, 1)
    assert (out - g.apply_tensor(img)).abs().max() < 0.05
    moved = ViewGeometry((103, 50, 263, 170), (80, 60), flip)
    assert (out - moved.apply_tensor(img)).abs().max() > 100
    vb, keep = g.boxes_in_view(box[None])
    x0, y0, x1, y1 = vb[0]
    bright = (out.mean(0) > 135).nonzero()
    assert (y0, y1) == (20, 40) and (x0, x1) == ((35, 55) if flip else (25, 45))
    assert bright[:, 0].min() == y0 and bright[:, 0].max() == y1 - 1
    assert bright[:, 1].min() == x0 and bright[:, 1].max() == x1 - 1
    assert len(bright) == (y1 - y0) * (x1 - x0)


def test_flip_mirrors_the_view(jpegs):
    g = ViewGeometry((13.5, 20, 213, 170), (64, 48))
    src = D.DaliImage(jpegs.paths[0])
    p = A.PhotoParams(jitter=(("contrast", 0.8), ("hue", 0.06)), blur_sigma=0.9, solarize=True)
    a, b = render_deferred({"v": [A.DeferredView(src, g, p), A.DeferredView(src, ViewGeometry(g.crop, g.out_size, True), p)]},
                           "cpu")["v"]
    torch.testing.assert_close(b, a.flip(-1), atol=1e-4, rtol=0)
    assert (a - b).abs().mean() > 0.05


# -- whole samples ---------------------------------------------------------------------------
def test_soco_boxes_unchanged_and_shapes_as_device(jpegs):
    m = build_method("soco", **{**SOCO_SMALL, "cutout": True, "cutout_prob": 1.0})
    batches = {lo: render_deferred(m.collate(_views(jpegs, lo, m)), "cpu") for lo in ("cpu", "device", "dali")}
    cpu, dev, dali = batches["cpu"], batches["device"], batches["dali"]
    box_keys = [k for k in cpu if k.startswith(("boxes_", "valid_", "ids_"))]
    assert box_keys and {k for k in dali if k.startswith(("boxes_", "valid_", "ids_"))} == set(box_keys)
    for k in box_keys:
        assert torch.equal(dali[k], cpu[k]), k
    for v in ("v1", "v2", "v3"):
        assert dali[v].shape == dev[v].shape == cpu[v].shape and dali[v].dtype == dev[v].dtype == torch.float32
        d = (_levels(dali[v]) - _levels(dev[v])).abs()   # cutout included; differences: border taps only
        assert d.mean() < 0.1 and d.max() < 8, (v, d.mean(), d.max())
        assert (dali[v] - cpu[v]).abs().mean() < 0.06, v
    assert (dali["v2"] == 0).all(1).any()                                       # cutout squares erased


def test_swav_multi_crop_slots(jpegs):
    m = build_method("swav", crop_sizes=[48, 32], num_crops=[2, 3], min_scale_crops=[0.14, 0.05],
                     max_scale_crops=[1.0, 0.14], backbone="resnet18")
    dev = render_deferred(m.collate(_views(jpegs, "device", m)), "cpu")
    dali = render_deferred(m.collate(_views(jpegs, "dali", m)), "cpu")
    assert dali["crops_0"].shape == dev["crops_0"].shape == (6, 3, 48, 48)
    assert dali["crops_1"].shape == dev["crops_1"].shape == (9, 3, 32, 32)
    for k in ("crops_0", "crops_1"):
        d = (_levels(dali[k]) - _levels(dev[k])).abs()   # border taps only (test_window_at_the_image_border)
        assert d.mean() < 0.1 and d.max() < 8, (k, d.mean(), d.max())


def test_one_pipeline_built_and_reused(jpegs, monkeypatch):
    D._PIPELINES.clear()
    built = []
    orig = D.build_pipeline
    monkeypatch.setattr(D, "build_pipeline", lambda *a: built.append(a[:2]) or orig(*a))
    m = build_method("moco_v2", crop_size=40)
    samples = _views(jpegs, "dali", m)
    for _ in range(3):
        out = render_deferred(m.collate(samples[:2]), "cpu")
        assert out["im_q"].shape == (2, 3, 40, 40)
    assert built == [(((40, 40), (40, 40)), 2)]
    render_deferred(m.collate(samples), "cpu")                 # a larger batch: rebuilt once
    render_deferred(m.collate(samples[:1]), "cpu")             # a smaller one reuses it
    assert built == [(((40, 40), (40, 40)), 2), (((40, 40), (40, 40)), 3)]


def test_corrupt_file_is_named(tmp_path):
    Image.fromarray(_smooth(64, 48)).save(tmp_path / "ok.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good = D.DaliImage(str(tmp_path / "ok.jpg"))
    bad = D.DaliImage.__new__(D.DaliImage)
    bad.path, bad.size, bad.data = str(tmp_path / "bad.jpg"), (64, 48), (tmp_path / "bad.jpg").read_bytes()
    g = ViewGeometry((0, 0, 64, 48), (32, 32))
    with pytest.raises(CorruptImage, match="bad.jpg"):
        render_deferred({"v": [A.DeferredView(good, g, A.PhotoParams()), A.DeferredView(bad, g, A.PhotoParams())]},
                        "cpu")


# -- config, errors, end to end --------------------------------------------------------------
def test_config_and_errors(monkeypatch, jpegs):
    cfg = pretrain_config("moco_v2", scale="tiny", recipe_overrides={"loader": "dali"})
    assert cfg["recipe"]["loader"] == "dali"
    with pytest.raises(ConfigError, match=r"recipe.loader: 'dali' is not supported by method 'byol'"):
        pretrain_config("byol", scale="tiny", recipe_overrides={"loader": "dali"})
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)            # DALI not importable
    with pytest.raises(ConfigError, match=r"recipe.loader: 'dali' needs NVIDIA DALI.*pip install -e '\.\[dali\]'"):
        jpegs.loader = "dali"
    jpegs.loader = "device"                                          # the others do not need it


def test_missing_dali_is_a_config_error_before_the_run(monkeypatch):
    """Planning a ``dali`` run without DALI fails in ``pretrain_config`` (the field and the
    package named), not later in a DataLoader worker."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)            # DALI not importable
    with pytest.raises(ConfigError) as err:
        pretrain_config("moco_v2", scale="tiny", recipe_overrides={"loader": "dali"})
    msg = str(err.value)
    assert msg.startswith("recipe.loader: 'dali' needs NVIDIA DALI, which is not importable here")
    assert "pip install -e '.[dali]'" in msg
    assert pretrain_config("moco_v2", scale="tiny", recipe_overrides={"loader": "device"})  # no DALI needed


@pytest.mark.parametrize("method", ["moco_v2", "soco"])
def test_pretrain_step_with_dali(isolated, method):
    from benchmark.runner import run_job
    from benchmark.runs.identity import run_key
    from benchmark.runs.job import Job
    from benchmark.runs.store import RunStore
    cfg = pretrain_config(method, scale="micro", recipe_overrides={"loader": "dali"})
    key = run_key(cfg)
    m = run_job(Job("pretrain", key, cfg, (), f"pretrain/{method}"), progress=False)
    assert m["steps"] == m["total_steps"] >= 1 and np.isfinite(m["final"]["loss"])
    assert RunStore().config(key)["recipe"]["loader"] == "dali"
