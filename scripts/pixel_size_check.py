"""What the model's pixel size means on scans of another pixel size, measured without new data.

OCTA-500 3M test images and labels (3 mm / 304 px, 9.87 um/px) are resized by each ``--factors`` value:
x0.667 (203 px) has the pixel size of a 4.5 mm scan of 304 px (14.8 um/px, vessels 1.5x thinner in
pixels), x1.5 (456 px) that of a 2 mm scan (6.6 um/px, vessels wider). The model segments them as they are
and with ``pixel_size_um`` given (each image resized to the model's pixel size, the map back), and DSC / AUC
are measured against the resized labels; the original test images give the reference row. The last
column counts the images the quality flag marks for a look (docs/MODEL_CARD.md), taken as `segment` takes
it: on the map at the model's pixel size.

    python scripts/pixel_size_check.py [--model seg.onnx] [--data ../shared/data/octa/OCTA-500_3M]
"""
import argparse
import time

import cv2
import numpy as np

from vesselfast.data import load_domain
from vesselfast.data.calibre import mean_width
from vesselfast.data.io import read_image
from vesselfast.export import Segmenter
from vesselfast.export.quality import quality_flags
from vesselfast.metrics import evaluate_images


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an exported .onnx (default: the shipped model)")
    p.add_argument("--data", default="../shared/data/octa/OCTA-500_3M")
    p.add_argument("--factors", type=float, nargs="+", default=[304 / 456, 1.5],
                   help="resize factors of the test images (default 0.667 and 1.5)")
    args = p.parse_args()
    if args.model is None:
        from vesselfast import shipped
        args.model = str(shipped.model_path())
    seg = Segmenter.load(args.model)
    test = load_domain([args.data], "target", "test", True)
    raws = [read_image(s.source_path) for s in test]
    native = seg.pixel_size_um
    rows = []

    def score(name, images, masks, px):
        t = time.perf_counter()
        pairs = [seg.predict(im, pixel_size_um=px, model_scale=True) for im in images]
        probs = [prob for prob, _ in pairs]
        res = evaluate_images(probs, masks, [np.ones(m.shape, bool) for m in masks], seg.threshold)
        sec = time.perf_counter() - t
        width = float(np.nanmean([mean_width(q >= seg.threshold) for q in probs]))
        rows.append((name, res["dsc"], res["auc"], float(np.mean([(q >= seg.threshold).mean() for q in probs])),
                     float(np.mean([m.mean() for m in masks])), width, float(np.nanmean([mean_width(m) for m in masks])),
                     sec, sum(quality_flags(at_model, seg.threshold, seg.meta.get("quality_reference"))["quality"]
                              == "check" for _, at_model in pairs), len(images)))

    score(f"original 3 mm scans, {native:.2f} um/px", raws, [s.mask for s in test], None)
    for factor in args.factors:
        how = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        images = [cv2.resize(r, None, fx=factor, fy=factor, interpolation=how) for r in raws]
        labels = [(cv2.resize(s.mask.astype(np.float32), None, fx=factor, fy=factor, interpolation=how)
                   >= 0.5).astype(np.uint8) for s in test]
        px = native / factor
        score(f"x{factor:.3g} ({images[0].shape[1]} px, {px:.2f} um/px), no --pixel-size", images, labels, None)
        score(f"x{factor:.3g}, --pixel-size {px:.2f}", images, labels, px)
    print(f"model {args.model}; {len(test)} OCTA-500 3M test images, as they are and resized")
    print("| images | DSC | AUC | marked share | label share | marked width px | label width px | seconds | flagged |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, dsc, auc, marked, share, width, label_width, sec, flagged, n in rows:
        print(f"| {name} | {dsc:.4f} | {auc:.4f} | {marked:.4f} | {share:.4f} | {width:.2f} | {label_width:.2f} | "
              f"{sec:.1f} | {flagged} / {n} |")


if __name__ == "__main__":
    main()
