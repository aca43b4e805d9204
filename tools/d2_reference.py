"""detectron2's parameter names and shapes for the config an export's fragment emits: detectron2
is not on PyPI, so its documented structure (facts of ``config/defaults.py``,
``modeling/backbone/resnet.py``, ``fpn.py``, ``roi_heads/box_head.py``, ``rpn.py``,
``fast_rcnn.py``, ``mask_head.py``, ``meta_arch/retinanet.py``; not their code) stands in for the
model, and ``match`` stands in for ``DetectionCheckpointer``'s ``matching_heuristics``.
Shared by tests/test_export_frameworks.py and tools/export_load_table.py."""
from __future__ import annotations

# config/defaults.py names (the keys the fragment may set)
D2_KEYS = {"MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.META_ARCHITECTURE", "MODEL.MASK_ON",
           "MODEL.BACKBONE.NAME", "MODEL.BACKBONE.FREEZE_AT", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.STRIDE_IN_1X1",
           "MODEL.RESNETS.NORM", "MODEL.RESNETS.OUT_FEATURES", "MODEL.RESNETS.RES2_OUT_CHANNELS",
           "MODEL.FPN.IN_FEATURES", "MODEL.FPN.OUT_CHANNELS", "MODEL.FPN.NORM", "MODEL.ROI_HEADS.NAME",
           "MODEL.ROI_HEADS.IN_FEATURES", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_BOX_HEAD.NAME",
           "MODEL.ROI_BOX_HEAD.NUM_CONV", "MODEL.ROI_BOX_HEAD.CONV_DIM", "MODEL.ROI_BOX_HEAD.NUM_FC",
           "MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NAME",
           "MODEL.ROI_MASK_HEAD.NUM_CONV", "MODEL.ROI_MASK_HEAD.CONV_DIM", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.RETINANET.NUM_CLASSES", "INPUT.FORMAT"}

# config/defaults.py values the fragment leaves at their defaults
_DEFAULTS = {"MODEL.FPN.OUT_CHANNELS": 256, "MODEL.FPN.NORM": "", "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
             "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.NUM_FC": 0, "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
             "MODEL.ROI_BOX_HEAD.NORM": "", "MODEL.ROI_HEADS.NUM_CLASSES": 80, "MODEL.RETINANET.NUM_CLASSES": 80,
             "MODEL.ROI_MASK_HEAD.NUM_CONV": 0, "MODEL.ROI_MASK_HEAD.CONV_DIM": 256, "MODEL.ROI_MASK_HEAD.NORM": "",
             "MODEL.MASK_ON": False, "MODEL.RESNETS.NORM": "FrozenBN"}
_BN = ("weight", "bias", "running_mean", "running_var")     # FrozenBN's buffers; SyncBN adds the counter


def flat(tree, pre=""):
    return {k2: v2 for k, v in tree.items()
            for k2, v2 in (flat(v, f"{pre}{k}.").items() if isinstance(v, dict) else [(f"{pre}{k}", v)])}


def fpn_box_shapes(cfg: dict, c: list[int]) -> dict:
    """detectron2's parameter shapes for ``cfg`` (FPN over res2-res5, FastRCNNConvFCHead):
    fpn_lateral{l} 1x1 C_l -> OUT, fpn_output{l} 3x3, conv{k} 3x3 CONV_DIM, fc1 over 7x7 (POOLER_RESOLUTION);
    no conv bias where NORM is set (``use_bias = norm == ""``)."""
    fpn, box = cfg["MODEL.FPN.OUT_CHANNELS"], cfg["MODEL.ROI_BOX_HEAD.CONV_DIM"]
    out = {}
    for lvl, ch in zip((2, 3, 4, 5), c):
        out[f"backbone.fpn_lateral{lvl}.weight"] = (fpn, ch, 1, 1)
        out[f"backbone.fpn_output{lvl}.weight"] = (fpn, fpn, 3, 3)
        if cfg["MODEL.FPN.NORM"]:
            out[f"backbone.fpn_lateral{lvl}.norm.running_var"] = (fpn,)
    for k in range(1, cfg["MODEL.ROI_BOX_HEAD.NUM_CONV"] + 1):
        out[f"roi_heads.box_head.conv{k}.weight"] = (box, fpn if k == 1 else box, 3, 3)
        if cfg["MODEL.ROI_BOX_HEAD.NORM"]:
            out[f"roi_heads.box_head.conv{k}.norm.weight"] = (box,)
    out["roi_heads.box_head.fc1.weight"] = (cfg["MODEL.ROI_BOX_HEAD.FC_DIM"], box * 49)
    return out


# ------------------------------------------------------------------ the whole model
def _conv(out: dict, name: str, o: int, i: int, k: int, norm: str, bias: bool | None = None):
    """A detectron2 ``Conv2d`` (``layers/wrappers.py``) with its optional ``norm`` submodule."""
    out[f"{name}.weight"] = (o, i, k, k)
    if bias if bias is not None else not norm:
        out[f"{name}.bias"] = (o,)
    if norm:
        for p in _BN + (("num_batches_tracked",) if norm in ("BN", "SyncBN") else ()):
            out[f"{name}.norm.{p}"] = () if p == "num_batches_tracked" else (o,)
        if norm == "GN":
            for p in ("running_mean", "running_var"):
                del out[f"{name}.norm.{p}"]


def _resnet(out: dict, pre: str, depth: int, norm: str, stages: tuple, res2_out: int):
    """``modeling/backbone/resnet.py``: BasicStem, then BasicBlock (R18/34) or BottleneckBlock
    stages res2..res5 (widths 64 * 2^i, bottleneck x4); shortcut where in != out channels."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    basic = depth in (18, 34)
    if 1 in stages:
        _conv(out, f"{pre}stem.conv1", 64, 3, 7, norm)
    cin = 64
    for s in range(1, 5):
        bott = 64 * 2 ** (s - 1)
        cout = bott if basic else (res2_out if s == 1 else 256 * 2 ** (s - 1))
        for b in range(blocks[s - 1]):
            name = f"{pre}res{s + 1}.{b}"
            if s in stages:
                if cin != cout:
                    _conv(out, f"{name}.shortcut", cout, cin, 1, norm)
                if basic:
                    _conv(out, f"{name}.conv1", cout, cin, 3, norm)
                    _conv(out, f"{name}.conv2", cout, cout, 3, norm)
                else:
                    _conv(out, f"{name}.conv1", bott, cin, 1, norm)
                    _conv(out, f"{name}.conv2", bott, bott, 3, norm)
                    _conv(out, f"{name}.conv3", cout, bott, 1, norm)
            cin = cout
    return cin


def model_shapes(cfg: dict) -> dict:
    """Every parameter and buffer (name -> shape) of the detectron2 model ``cfg`` (a flat dict of
    the fragment's keys) builds: ResNet, FPN (with LastLevelMaxPool / LastLevelP6P7), RPN,
    box head and predictor, mask head; RetinaNet's head."""
    g = {**_DEFAULTS, **cfg}.get
    depth, norm = g("MODEL.RESNETS.DEPTH"), g("MODEL.RESNETS.NORM")
    res2 = g("MODEL.RESNETS.RES2_OUT_CHANNELS") or 256
    widths = {s: (64 * 2 ** (s - 1) if depth in (18, 34) else (res2 if s == 1 else 256 * 2 ** (s - 1))) for s in range(1, 5)}
    out: dict = {}
    arch, name = g("MODEL.META_ARCHITECTURE"), g("MODEL.BACKBONE.NAME")
    fpn, fnorm = g("MODEL.FPN.OUT_CHANNELS"), g("MODEL.FPN.NORM")
    k = g("MODEL.ROI_HEADS.NUM_CLASSES")
    if name in ("build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone"):
        _resnet(out, "backbone.bottom_up.", depth, norm, (1, 2, 3, 4), res2)
        levels = (2, 3, 4, 5) if name == "build_resnet_fpn_backbone" else (3, 4, 5)
        for lvl in levels:
            _conv(out, f"backbone.fpn_lateral{lvl}", fpn, widths[lvl - 1], 1, fnorm)
            _conv(out, f"backbone.fpn_output{lvl}", fpn, fpn, 3, fnorm)
        if name == "build_retinanet_resnet_fpn_backbone":   # LastLevelP6P7(C5 channels, OUT), "res5"
            _conv(out, "backbone.top_block.p6", fpn, widths[4], 3, "", True)
            _conv(out, "backbone.top_block.p7", fpn, fpn, 3, "", True)
        feat = fpn
    else:   # C4: the backbone to res4, res5 in the RoI head (Res5ROIHeads)
        _resnet(out, "backbone.", depth, norm, (1, 2, 3), res2)
        _resnet(out, "roi_heads.", depth, norm, (4,), res2)
        if g("MODEL.ROI_HEADS.NAME") == "Res5ROIHeadsExtraNorm":   # MoCo's: BN after res5
            for p in _BN + ("num_batches_tracked",):
                out[f"roi_heads.res5.norm.{p}"] = () if p == "num_batches_tracked" else (widths[4],)
        feat = widths[3]
    if arch == "RetinaNet":   # RetinaNetHead: 4 convs per subnet, 9 anchors (3 scales x 3 ratios)
        a, kr = 9, g("MODEL.RETINANET.NUM_CLASSES")
        for sub in ("cls_subnet", "bbox_subnet"):
            for i in range(4):
                _conv(out, f"head.{sub}.{2 * i}", fpn, fpn, 3, "", True)
        _conv(out, "head.cls_score", a * kr, fpn, 3, "", True)
        _conv(out, "head.bbox_pred", a * 4, fpn, 3, "", True)
        return out
    a = 3 if name == "build_resnet_fpn_backbone" else 15   # one size per level x 3 ratios; C4: 5 sizes x 3
    _conv(out, "proposal_generator.rpn_head.conv", feat, feat, 3, "", True)
    _conv(out, "proposal_generator.rpn_head.objectness_logits", a, feat, 1, "", True)
    _conv(out, "proposal_generator.rpn_head.anchor_deltas", a * 4, feat, 1, "", True)
    if name == "build_resnet_fpn_backbone":   # FastRCNNConvFCHead over 7x7
        conv, nconv, bnorm = g("MODEL.ROI_BOX_HEAD.CONV_DIM"), g("MODEL.ROI_BOX_HEAD.NUM_CONV"), g("MODEL.ROI_BOX_HEAD.NORM")
        cin = fpn
        for i in range(1, nconv + 1):
            _conv(out, f"roi_heads.box_head.conv{i}", conv, cin, 3, bnorm)
            cin = conv
        dim = cin * 49
        for i in range(1, g("MODEL.ROI_BOX_HEAD.NUM_FC") + 1):
            out[f"roi_heads.box_head.fc{i}.weight"] = (g("MODEL.ROI_BOX_HEAD.FC_DIM"), dim)
            out[f"roi_heads.box_head.fc{i}.bias"] = (g("MODEL.ROI_BOX_HEAD.FC_DIM"),)
            dim = g("MODEL.ROI_BOX_HEAD.FC_DIM")
    else:
        dim = widths[4]   # res5 output, average pooled
    out.update({"roi_heads.box_predictor.cls_score.weight": (k + 1, dim), "roi_heads.box_predictor.cls_score.bias": (k + 1,),
                "roi_heads.box_predictor.bbox_pred.weight": (k * 4, dim), "roi_heads.box_predictor.bbox_pred.bias": (k * 4,)})
    if g("MODEL.MASK_ON"):   # MaskRCNNConvUpsampleHead
        mconv, mnorm = g("MODEL.ROI_MASK_HEAD.CONV_DIM"), g("MODEL.ROI_MASK_HEAD.NORM")
        cin = fpn if name == "build_resnet_fpn_backbone" else widths[4]
        for i in range(1, g("MODEL.ROI_MASK_HEAD.NUM_CONV") + 1):
            _conv(out, f"roi_heads.mask_head.mask_fcn{i}", mconv, cin, 3, mnorm)
            cin = mconv
        out["roi_heads.mask_head.deconv.weight"] = (cin, mconv, 2, 2)   # ConvTranspose2d: (in, out, kH, kW)
        out["roi_heads.mask_head.deconv.bias"] = (mconv,)
        _conv(out, "roi_heads.mask_head.predictor", k, mconv, 1, "", True)
    return out


def match(model: dict, ckpt: dict) -> dict:
    """``align_and_update_state_dicts`` (checkpoint/c2_model_loading.py, matching_heuristics):
    each model key takes the longest checkpoint key that is it or a ``.``-suffix of it, if the
    shapes agree. Returns ``{"loaded": {model key: ckpt key}, "missing", "unexpected", "shape"}``."""
    loaded, shape = {}, []
    for mk, ms in model.items():
        cands = [ck for ck in ckpt if mk == ck or mk.endswith("." + ck)]
        if not cands:
            continue
        ck = max(cands, key=len)
        if tuple(ckpt[ck]) == tuple(ms):
            loaded[mk] = ck
        else:
            shape.append(f"{mk}: model {tuple(ms)}, file {tuple(ckpt[ck])}")
    used = set(loaded.values())
    return {"loaded": loaded, "missing": sorted(set(model) - set(loaded)),
            "unexpected": sorted(set(ckpt) - used), "shape": shape}
