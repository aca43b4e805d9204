"""The three loaders (recipe.loader cpu | cpu_draft | device): identical parameter draws,
batched photometric equal to torchvision's per-sample ops, tensor geometry equal to PIL's,
boxes unchanged by the switch, DCT-scaled decode keeping boxes on their pixels, run keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

from benchmark.experiments.config import pretrain_config
from benchmark.data.errors import CorruptImage
from benchmark.data import io as data_io
from benchmark.data.images import ImageSource, render_deferred
from benchmark.data.io import EncodedImage, LazyImage, read_rgb
from benchmark.runs.identity import run_key
from methods import augment as A
from methods import build_method
from methods.config import ConfigError
from methods.geometry import ViewGeometry, whole_view

ALL_ON = A.Photometric(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0, gray_p=0.4, blur_p=0.5, solarize_p=0.4)
NO_AUG = A.Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
SOCO_SMALL = {"proposal_source": "random", "view_size": 64, "v3_size": 32, "fpn_channels": 16,
              "head_conv_dim": 16, "head_fc_dim": 32, "proj_hidden_dim": 32, "proj_dim": 16,
              "pred_hidden_dim": 32, "backbone": "resnet18"}


def _smooth(w: int, h: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC))


@pytest.fixture
def jpegs(tmp_path):
    for i in range(3):
        Image.fromarray(_smooth(320, 240, i)).save(tmp_path / f"{i}.jpg", quality=92)
    return ImageSource.from_folder(tmp_path)


# -- parameters -----------------------------------------------------------------------
def test_call_draws_exactly_what_draw_draws():
    img = Image.fromarray(_smooth(40, 30))
    for seed in range(20):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        out = ALL_ON(img, r1)
        p = ALL_ON.draw(r2)
        assert r1.random() == r2.random()            # same number of draws consumed
        assert np.array_equal(np.asarray(out), np.asarray(A.apply_pil(img, p)))
        assert sorted(op for op, _ in p.jitter) == ["brightness", "contrast", "hue", "saturation"]
        f = dict(p.jitter)
        assert 0.6 <= f["brightness"] <= 1.4 and -0.1 <= f["hue"] <= 0.1
        assert p.blur_sigma == 0 or 0.1 <= p.blur_sigma <= 2.0


@pytest.mark.parametrize("name,cfg", [("moco_v2", {"crop_size": 64}),
                                      ("soco", {"proposal_source": "random", "view_size": 64,
                                                "v3_size": 32, "fpn_channels": 16, "head_conv_dim": 16,
                                                "head_fc_dim": 32, "proj_hidden_dim": 32, "proj_dim": 16,
                                                "pred_hidden_dim": 32, "backbone": "resnet18"})])
def test_device_loader_draws_identical_parameters(name, cfg, jpegs, monkeypatch):
    drawn: list = []
    orig = A.Photometric.draw
    monkeypatch.setattr(A.Photometric, "draw", lambda self, rng: drawn.append(orig(self, rng)) or drawn[-1])
    m = build_method(name, **cfg)
    per_loader = {}
    for loader in ("cpu", "cpu_draft", "device"):
        jpegs.loader = loader
        drawn.clear()
        rng = np.random.default_rng(7)
        sample = m.views(jpegs.record(1), rng)
        per_loader[loader] = (list(drawn), rng.random(), sample)
    cpu, device = per_loader["cpu"], per_loader["device"]
    assert len(cpu[0]) >= 2 and cpu[0] == device[0] == per_loader["cpu_draft"][0]
    assert cpu[1] == device[1] == per_loader["cpu_draft"][1]      # the rng streams stay in step
    deferred = [v for v in device[2].values() if isinstance(v, A.DeferredView)]
    assert [d.photo for d in deferred] == cpu[0]


# -- batched photometric ------------------------------------------------------------------
def _per_sample_torchvision(x: torch.Tensor, p: A.PhotoParams) -> torch.Tensor:
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for op, f in p.jitter:
        x = ops[op](x, f)
    if p.gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur_sigma:
        k = A.blur_kernel_size(p.blur_sigma)
        x = TF.gaussian_blur(x, [k, k], [p.blur_sigma, p.blur_sigma])
    if p.solarize:
        x = TF.solarize(x, A.SOLARIZE_THRESHOLD / 255)
    return x


def test_batched_photometric_equals_torchvision_per_sample():
    rng = np.random.default_rng(0)
    params = [ALL_ON.draw(rng) for _ in range(12)]
    # the draws cover every op, each order position and both branches of each switch
    assert {p.gray for p in params} == {True, False} and {p.solarize for p in params} == {True, False}
    assert {p.blur_sigma > 0 for p in params} == {True, False}
    assert len({p.jitter[0][0] for p in params}) >= 3
    x = torch.from_numpy(np.stack([_smooth(36, 28, s) for s in range(12)])).permute(0, 3, 1, 2).float() / 255
    out = A.photometric_batch(x.clone(), params)
    ref = torch.stack([_per_sample_torchvision(x[i], p) for i, p in enumerate(params)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x, atol=1e-2)


def test_batched_photometric_close_to_pil_path():
    """Same parameters, PIL on uint8 vs float tensors (blur left out: PIL's is a box-blur
    approximation): within a few grey levels."""
    rng = np.random.default_rng(1)
    aug = A.Photometric(jitter_p=1.0, gray_p=0.3, blur_p=0.0, solarize_p=0.3)
    imgs = [_smooth(48, 40, s) for s in range(8)]
    params = [aug.draw(rng) for _ in imgs]
    pil = np.stack([np.asarray(A.apply_pil(Image.fromarray(a), p)) for a, p in zip(imgs, params)]).astype(float)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    ten = (A.photometric_batch(x, params) * 255).permute(0, 2, 3, 1).numpy()
    diff = np.abs(pil - ten)
    assert diff.mean() < 2.5, diff.mean()           # 1.6: PIL rounds to uint8 after every op
    assert np.percentile(diff, 99) < 8, np.percentile(diff, 99)


# -- geometry on tensors and on reduced decodes -------------------------------------------
@pytest.mark.parametrize("geom", [ViewGeometry((13, 20, 213, 170), (64, 48), True),
                                  ViewGeometry((0, 0, 320, 240), (96, 96)),
                                  ViewGeometry((100, 50, 140, 90), (80, 80)),          # upsampling
                                  ViewGeometry((6.5, 10.25, 206.5, 187.75), (56, 56))])
def test_apply_tensor_matches_pil(geom):
    a = _smooth(320, 240, 3)
    pil = np.asarray(geom.apply_image(a)).astype(float)
    ten = geom.apply_tensor(torch.from_numpy(a.copy()).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert ten.shape == pil.shape
    assert np.abs(pil - ten).max() <= 1.0 + 1e-4        # PIL rounds to uint8 between its passes


def _scene(path, size=(808, 600), box=(203, 149, 499, 371)):
    img = Image.new("RGB", size, (30, 30, 30))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(240, 240, 240))
    img.save(path, quality=95)
    return np.array(box, dtype=float)


@pytest.mark.parametrize("geom,reduce", [(whole_view(808, 600, (100, 74)), 8),
                                         (ViewGeometry((101, 77, 741, 557), (160, 120), True), 4),
                                         (ViewGeometry((150, 90, 550, 390), (200, 150)), 2)])
def test_draft_decode_keeps_boxes_on_their_pixels(tmp_path, geom, reduce):
    box = _scene(tmp_path / "s.jpg")
    lazy = LazyImage(str(tmp_path / "s.jpg"))
    assert lazy.size == (808, 600)
    t = A.render_view(lazy, geom, NO_AUG, np.random.default_rng(0))
    img, r = lazy.pixels(A.draft_reduction(geom))
    assert r == reduce and img.size == (-(-808 // r), -(-600 // r))      # decoded small, ceil(W / r)
    full = A.render_view(Image.open(tmp_path / "s.jpg").convert("RGB"), geom, NO_AUG, np.random.default_rng(0))
    px = (t * torch.tensor(A.IMAGENET_STD)[:, None, None] + torch.tensor(A.IMAGENET_MEAN)[:, None, None]) * 255
    vb, keep = geom.boxes_in_view(box[None])
    x0, y0, x1, y1 = vb[0]
    inside = px[:, int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
    assert inside.min() > 200                       # the box's pixels are bright where the box maps
    ring = torch.ones(px.shape[1:], dtype=torch.bool)
    ring[max(0, int(y0) - 2):int(np.ceil(y1)) + 2, max(0, int(x0) - 2):int(np.ceil(x1)) + 2] = False
    assert px[:, ring].max() < 60                   # and nowhere else
    assert (t - full).abs().mean() < 0.05           # close to the full-size decode's view


def test_draft_reduction():
    assert A.draft_reduction(ViewGeometry((0, 0, 40, 30), (64, 64))) == 1          # upsampled
    assert A.draft_reduction(ViewGeometry((0, 0, 500, 375), (224, 224))) == 1      # 375 -> 224: 1.67
    assert A.draft_reduction(ViewGeometry((0, 0, 1000, 750), (224, 224))) == 2     # 750 -> 224: 3.35
    assert A.draft_reduction(ViewGeometry((0, 0, 1800, 1800), (224, 224))) == 8


def test_soco_decodes_a_lazy_image_once_at_the_finest_scale_its_views_need(tmp_path, monkeypatch):
    Image.fromarray(_smooth(1000, 750)).save(tmp_path / "big.jpg", quality=90)
    calls = []
    orig = data_io.read_rgb
    monkeypatch.setattr(data_io, "read_rgb", lambda path, reduce=1: calls.append(reduce) or orig(path, reduce))
    m = build_method("soco", **{**SOCO_SMALL, "view_size": 224, "v3_size": 112})
    lazy = LazyImage(str(tmp_path / "big.jpg"))
    geoms = m.view_geometries(1000, 750, np.random.default_rng(5))
    m.views({"index": 0, "image_id": 1, "image": lazy}, np.random.default_rng(5))
    want = min(A.draft_reduction(g) for g in geoms.values())
    assert want == 2 and calls == [2] and lazy.pixels()[1] == 1 and calls == [2, 1]


def test_read_rgb_reduce_and_errors(tmp_path):
    _scene(tmp_path / "s.jpg")
    assert read_rgb(tmp_path / "s.jpg", reduce=4).size == (202, 150)
    Image.fromarray(_smooth(40, 30)).save(tmp_path / "p.png")
    assert read_rgb(tmp_path / "p.png", reduce=4).size == (40, 30)     # not a JPEG: full size
    with pytest.raises(CorruptImage, match="nope.jpg"):
        read_rgb(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(CorruptImage, match="bad.jpg"):
        LazyImage(str(tmp_path / "bad.jpg")).pixels()
    with pytest.raises(CorruptImage, match="bad.jpg"):
        render_deferred({"v": [A.DeferredView(EncodedImage(str(tmp_path / "s.jpg")), whole_view(808, 600, 32),
                                              A.PhotoParams()),
                               A.DeferredView(_Broken(str(tmp_path / "bad.jpg")), whole_view(808, 600, 32),
                                              A.PhotoParams())]}, "cpu")


class _Broken(EncodedImage):
    def __init__(self, path):
        self.path, self.size, self.data = path, (808, 600), open(path, "rb").read()


# -- the switch on whole samples ---------------------------------------------------------
def test_boxes_unchanged_by_the_switch_and_device_batch_renders(jpegs):
    m = build_method("soco", **SOCO_SMALL)
    batches = {}
    for loader in ("cpu", "cpu_draft", "device"):
        jpegs.loader = loader
        samples = [m.views(jpegs.record(i), np.random.default_rng(i)) for i in range(len(jpegs))]
        batches[loader] = render_deferred(m.collate(samples), "cpu")
    cpu = batches["cpu"]
    for loader in ("cpu_draft", "device"):
        b = batches[loader]
        box_keys = [k for k in cpu if k.startswith(("boxes_", "valid_"))]
        assert box_keys and set(box_keys) == {k for k in b if k.startswith(("boxes_", "valid_"))}
        for k in box_keys:
            assert torch.equal(b[k], cpu[k]), (loader, k)
        for v in ("v1", "v2", "v3"):
            assert b[v].shape == cpu[v].shape and b[v].dtype == torch.float32
            assert (b[v] - cpu[v]).abs().mean() < 0.06, (loader, v)


def test_default_cpu_loader_is_the_unchanged_pil_path(jpegs):
    m = build_method("moco_v2", crop_size=48)
    rec = jpegs.record(0)
    s = m.views(rec, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    img = Image.fromarray(rec["image"])
    from methods.geometry import random_view
    for name in ("im_q", "im_k"):
        g = random_view(img.width, img.height, 48, rng, scale=(0.2, 1.0))
        ref = TF.normalize(TF.to_tensor(A.MOCO_V2_AUG(g.apply_image(img), rng)), A.IMAGENET_MEAN, A.IMAGENET_STD)
        assert torch.equal(s[name], ref)


def test_loader_in_config_and_run_key():
    base = pretrain_config("moco_v2", scale="tiny")
    assert "loader" not in base["recipe"]
    same = pretrain_config("moco_v2", scale="tiny", recipe_overrides={"loader": "cpu"})
    assert run_key(same) == run_key(base)
    dev = pretrain_config("soco", scale="tiny", recipe_overrides={"loader": "device"})
    assert dev["recipe"]["loader"] == "device"
    assert run_key(dev) != run_key(pretrain_config("soco", scale="tiny"))
    with pytest.raises(ConfigError, match="recipe.loader"):
        pretrain_config("moco_v2", scale="tiny", recipe_overrides={"loader": "gpu"})
    with pytest.raises(ConfigError, match="recipe.loader.*supervised"):
        pretrain_config("supervised", scale="tiny", recipe_overrides={"loader": "device"})


@pytest.mark.slow
@pytest.mark.parametrize("method,loader", [("soco", "device"), ("moco_v2", "cpu_draft")])
def test_pretrain_runs_with_the_loader_recorded(isolated, method, loader):
    from benchmark.runs.job import Job
    from benchmark.runner import run_job
    from benchmark.runs.store import RunStore
    cfg = pretrain_config(method, scale="micro", recipe_overrides={"loader": loader})
    key = run_key(cfg)
    m = run_job(Job("pretrain", key, cfg, (), f"pretrain/{method}"), progress=False)
    assert m["steps"] == m["total_steps"] and np.isfinite(m["final"]["loss"])
    assert RunStore().config(key)["recipe"]["loader"] == loader
