"""Issue 26: the mmdet exports load into the real mmdet 3.3.0 (mmengine 0.10.7, mmcv-lite 2.2.0),
installed by ``make test-mmdet`` into .cache/mmdet-site, which only this module puts on
``sys.path``. The detector is built from mmdet's own ``_base_/models`` config with the emitted
``mmdet_config.py`` pasted over it and loaded by mmengine's ``load_checkpoint``: no missing key
among the exported groups, none unexpected, every value arrived, and the outputs of mmdet's
ResNet, FPN, Shared4Conv1FCBBoxHead (and RPNHead, FCNMaskHead, RetinaHead for fine-tuned
detectors) equal ours. mmcv-lite has no compiled ops: ``mmcv.ops`` is stubbed
(tools/export_load_table.py ``import_mmdet``), none of these modules needs one."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SITE = Path(__file__).resolve().parents[1] / ".cache" / "mmdet-site"
if SITE.is_dir() and str(SITE) not in sys.path:
    sys.path.insert(0, str(SITE))
pytest.importorskip("mmengine", reason=f"mmengine/mmdet are not installed in {SITE} (make test-mmdet)")
if importlib.util.find_spec("mmdet") is None:   # not importorskip: mmdet's __init__ asserts mmcv < 2.2 (import_mmdet)
    pytest.skip(f"mmdet is not installed in {SITE} (make test-mmdet)", allow_module_level=True)

from tools import export_load_table as T  # noqa: E402

try:
    T.import_mmdet()
except ImportError as e:   # pragma: no cover - an incomplete install
    pytest.skip(f"mmdet does not import from {SITE}: {e}", allow_module_level=True)

pytestmark = pytest.mark.mmdet
ATOL = 1e-5


def _assert_loads_whole(r: dict):
    assert r["missing"] == [], r["missing"][:5]
    assert r["unexpected"] == [], r["unexpected"][:5]
    assert r["not_loaded"] == [], r["not_loaded"][:5]       # shape mismatches: the value never arrived
    assert all(d <= ATOL for d in r["diff"].values()), r["diff"]


# every method at R18; at R50 (time) SoCo (backbone, FPN, box head) and MoCo v2 (backbone) stand
# for InsLoc and PixPro, which export the same structures (tools.export_load_table covers all eight)
@pytest.mark.parametrize("method, arch", [(m, "R18") for m in T.METHODS] + [("soco", "R50"), ("moco_v2", "R50")])
def test_pretrain_export_loads_into_mmdet(tmp_path, method, arch):
    r = T.check_mmdet(T.pretrain_state(method, arch), tmp_path)
    _assert_loads_whole(r)
    groups = {"moco_v2": {"backbone"}, "pixpro": {"backbone"}}.get(method, {"backbone", "fpn", "box_head"})
    assert set(r["diff"]) == groups
    assert r["loaded"] == {("R18", False): 120, ("R50", False): 318, ("R18", True): 194, ("R50", True): 392}[
        arch, "fpn" in groups]


@pytest.mark.parametrize("name", ["mask_rcnn", "retinanet"])
def test_finetuned_export_loads_into_mmdet(tmp_path, name):
    model, state = T.finetuned(name)
    r = T.check_mmdet(state, tmp_path, model)
    _assert_loads_whole(r)
    heads = {"mask_rcnn": {"rpn_head", "box_head", "box_predictor", "mask_head"}, "retinanet": {"retina_head"}}[name]
    assert heads <= set(r["diff"])


def test_c4_export_in_mmdet_leaves_only_moco_extra_norm(tmp_path):
    """mmdet has no ResLayerExtraNorm (mmselfsup's): in mmdet's ResLayer every key but the
    extra norm loads, and res5 gives our outputs."""
    model, state = T.finetuned("mask_rcnn_c4")
    r = T.check_mmdet(state, tmp_path, model)
    assert r["missing"] == [] and r["not_loaded"] == []
    assert {k.rsplit(".", 1)[0] for k in r["unexpected"]} == {"roi_head.shared_head.norm"}
    assert r["diff"] == {"backbone": 0.0, "res5": 0.0}
