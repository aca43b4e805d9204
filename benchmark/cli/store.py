"""The run store: `detbench runs`, `export`, and `data check` for a dataset before a run."""
from __future__ import annotations

import json
import sys

from benchmark.cli.args import run_key_arg
from benchmark.runs.store import RunStore, STAGES, STATUSES


def cmd_runs(args) -> int:
    import pandas as pd

    from benchmark.reporting.results import load_runs
    df = load_runs(args.runs)
    for col in ("stage", "status", "scale"):
        if getattr(args, col):
            df = df[df[col] == getattr(args, col)]
    if args.format == "csv":
        sys.stdout.write(df.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S"))
        return 0
    if args.format == "json":
        recs = df.astype(object).where(df.notna(), None).to_dict(orient="records")
        sys.stdout.write(json.dumps(recs, indent=1, default=str) + "\n")
        return 0
    for _, r in df.iterrows():
        made = "unknown date    " if pd.isna(r["created"]) else f"{r['created']:%Y-%m-%d %H:%M}"
        print(f"{r['key']}  {r['status']:11s} {r['stage'] or '?':9s} {r['scale'] or '?':10s} {made}  {r['label']}")
    print(f"{len(df)} runs in {RunStore(args.runs).root} (date: when the run started, from its env.json)")
    return 0


def cmd_export(args) -> int:
    from benchmark.stages.export import export_run
    report = export_run(RunStore(args.runs), run_key_arg(args.run, "--run"), args.to, args.out,
                        allow_unmapped=args.allow_unmapped)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    if report.get("config"):   # the fragment that loads the file whole, as the user copies it
        print(f"\n# {report.get('config_path', 'config')}:\n{report['config']}")
    return 0


def cmd_data_check(args) -> int:
    from benchmark.data.user import check_dataset, parse_data_args
    data = parse_data_args(args.path)
    r = check_dataset(data, decode=not args.no_decode)
    bad = 0
    print(f"dataset: {data.get('kind')}")
    for name, e in r["splits"].items():
        print(f"{name}: {e['images']} images in {e['image_root']}" + (f" ({e['ann_file']})" if "ann_file" in e else ""))
        if "boxes" in e:
            b = e["boxes_per_image"]
            print(f"  boxes: {e['boxes']} ({b['mean']} per image, {b['min']}..{b['max']}); "
                  f"{e['images_without_boxes']} images without boxes; {e['crowd_regions']} crowd regions")
            if e["boxes_clipped"] or e["boxes_dropped"]:
                print(f"  {e['boxes_clipped']} boxes clipped to their image, {e['boxes_dropped']} empty boxes dropped")
            per = sorted(e["boxes_per_class"].items(), key=lambda kv: -kv[1])
            empty = [k for k, v in per if not v]
            print(f"  classes: {e['classes']}; most boxes: " + ", ".join(f"{k} {v}" for k, v in per[:8] if v)
                  + (f"; {len(empty)} without boxes" if empty else ""))
            sz = e["image_size"]
            print(f"  image size (w x h): min {sz['min'][0]}x{sz['min'][1]}, median {sz['median'][0]}x"
                  f"{sz['median'][1]}, max {sz['max'][0]}x{sz['max'][1]}")
        refused = 0
        for what in ("missing_files", "missized_files", "unreadable_files"):
            for f in e[what]:
                print(f"  {what.split('_')[0]}: {f}")
            bad += len(e[what])
            refused += len(e[what]) if what != "unreadable_files" else 0
        if not bad:
            print("  every image file " + ("decodes" if not args.no_decode else "exists"))
    if args.json:
        print(json.dumps(r, indent=1))
    counts = {w: sum(len(e[f"{w}_files"]) for e in r["splits"].values()) for w in ("missing", "missized", "unreadable")}
    said = []
    if counts["missing"] or counts["missized"]:
        said.append(f"{counts['missing']} missing and {counts['missized']} mis-sized image file(s): a run refuses "
                    f"the dataset before it starts (fix the files or the annotation file)")
    if counts["unreadable"]:
        said.append(f"{counts['unreadable']} undecodable image file(s): a run skips them (recorded in the run) and "
                    f"stops above 1% of a split (DETBENCH_MAX_UNREADABLE)")
    print("ok" if not bad else "; ".join(said))
    return 0 if not bad else 1


def add_parsers(sub) -> None:
    s = sub.add_parser("runs", help="list the run store (--format csv|json: every column of load_runs())")
    s.add_argument("--runs", default=None)
    s.add_argument("--stage", default=None, choices=STAGES)
    s.add_argument("--status", default=None, choices=STATUSES)
    s.add_argument("--scale", default=None, help="only runs of this scale (tiny, tiny_long, ...)")
    s.add_argument("--format", default="table", choices=["table", "csv", "json"])
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("export", help="write a run's weights for detectron2, mmdet or torchvision")
    s.add_argument("--run", required=True, help="pretraining (weights.pt) or fine-tuning run key")
    s.add_argument("--to", required=True, choices=["detectron2", "mmdet", "torchvision"])
    s.add_argument("--out", default=None, help="file to write (default results/exports/<run>/<framework>.pkl|.pth)")
    s.add_argument("--allow-unmapped", action="store_true",
                   help="leave out keys the framework has no name for (listed in the output) instead of failing")
    s.add_argument("--runs", default=None)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("data", help="your own data: `detbench data check PATH` validates it before a long run")
    dsub = s.add_subparsers(dest="data_cmd", required=True)
    c = dsub.add_parser("check", help="validate a dataset and print its statistics (images, boxes per image, "
                                      "classes, sizes, unreadable files)")
    c.add_argument("path", nargs="+", help="as --data: split=ANN.json:IMAGES/ ..., or a dataset.yaml, VOC folder "
                                           "or COCO-layout folder")
    c.add_argument("--no-decode", action="store_true", help="check that image files exist, without decoding them")
    c.add_argument("--json", action="store_true", help="also print the statistics as JSON")
    c.set_defaults(fn=cmd_data_check)
