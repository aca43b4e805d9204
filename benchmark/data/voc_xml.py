"""PASCAL VOC annotation files: read one (:func:`parse_voc_xml`) or write one (:func:`write_voc_xml`).

Boxes: VOC stores 1-based inclusive pixel indices; like detectron2's ``pascal_voc.py`` a box
``(xmin, ymin, xmax, ymax)`` becomes ``[xmin - 1, ymin - 1, xmax, ymax]`` in 0-based continuous
pixels (``xmin = 1, xmax = W`` covers the whole image); :func:`write_voc_xml` inverts it.
Bad input raises :class:`~benchmark.data.errors.DataError` naming the file and the field.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmark.data.errors import DataError


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(path, f"{where}.{tag}" if where else tag, "missing")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str) -> float:
    raw = _text(node, tag, path, where)
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise DataError(path, f"{where}.{tag}", f"expected a number, got {raw!r}")
    return v


def parse_voc_xml(path: str | Path, class_names: tuple[str, ...] | list[str], *,
                  data: bytes | None = None) -> dict:
    """One VOC annotation file -> ``{"width", "height", "filename" (its ``<filename>``, None
    when absent), "objects": [{"label" (1-based index into class_names), "name", "box"
    (0-based xyxy), "difficult", "truncated"}]}``.

    ``data``: the file's bytes when the caller has read them already."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise DataError(path, "<file>", "annotation file not found")
        data = path.read_bytes()
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(path, "<xml>", f"malformed XML: {e}") from None
    if root.tag != "annotation":
        raise DataError(path, "<root>", f"expected an <annotation> element, got <{root.tag}>")
    size = root.find("size")
    if size is None:
        raise DataError(path, "size", "missing")
    wh = []
    for tag in ("width", "height"):
        v = _number(size, tag, path, "size")
        if v <= 0 or not v.is_integer():
            raise DataError(path, f"size.{tag}", f"expected a positive integer, got {v:g}")
        wh.append(int(v))
    W, H = wh
    index = {n: i + 1 for i, n in enumerate(class_names)}
    objects = []
    for i, obj in enumerate(root.findall("object")):
        where = f"object[{i}]"
        name = _text(obj, "name", path, where)
        if name not in index:
            raise DataError(path, f"{where}.name", f"unknown class {name!r} (known: {', '.join(class_names)})")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(path, f"{where}.bndbox", "missing")
        xmin, ymin, xmax, ymax = (_number(box, t, path, f"{where}.bndbox") for t in ("xmin", "ymin", "xmax", "ymax"))
        # 1-based inclusive indices: 1 <= xmin <= xmax <= W. A 0 at the low border occurs in a
        # few VOC files and means the border: it is clamped, anything further out is an error.
        for tag, lo, hi, v in (("xmin", 0, W, xmin), ("ymin", 0, H, ymin), ("xmax", 1, W, xmax), ("ymax", 1, H, ymax)):
            if not lo <= v <= hi:
                raise DataError(path, f"{where}.bndbox.{tag}",
                                f"{v:g} is outside the image (width {W}, height {H}; expected {lo}..{hi})")
        if xmax < xmin or ymax < ymin:
            raise DataError(path, f"{where}.bndbox",
                            f"empty box: xmin {xmin:g} > xmax {xmax:g} or ymin {ymin:g} > ymax {ymax:g}")
        flags = {}
        for tag in ("difficult", "truncated"):
            node = obj.find(tag)
            raw = node.text.strip() if node is not None and node.text else "0"
            if raw not in ("0", "1"):
                raise DataError(path, f"{where}.{tag}", f"expected 0 or 1, got {raw!r}")
            flags[tag] = int(raw)
        objects.append({"name": name, "label": index[name],
                        "box": (max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0), xmax, ymax), **flags})
    if not objects:
        raise DataError(path, "object", "empty annotation set: no <object> in the file")
    filename = (root.findtext("filename") or "").strip() or None
    if filename is not None and (Path(filename).is_absolute() or ".." in Path(filename).parts):
        raise DataError(path, "filename", f"expected a file name inside JPEGImages/, got {filename!r}")
    return {"width": W, "height": H, "objects": objects, "filename": filename}


def write_voc_xml(path: str | Path, *, folder: str, filename: str, width: int, height: int,
                  objects: list[dict]) -> None:
    """Write one VOC annotation file. ``objects``: ``{"name", "box" (0-based xyxy, integer
    pixel edges), "difficult", "truncated"}``; stored as 1-based inclusive indices."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = o["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(o.get("truncated", 0)))
        ET.SubElement(node, "difficult").text = str(int(o.get("difficult", 0)))
        box = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = o["box"]
        for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = f"{v:g}"
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)
