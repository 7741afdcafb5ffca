"""Round-1 variants compared on one finished run: DSC after round 1 and U-Net evaluations per image.
Every variant reuses the run's generators, latents, F^0 and G_T^1 (copied into a sibling directory per
variant), so only synthesize_1 and segmenter_1 differ. A variant is NAME=key=value[,key=value...].

    python scripts/compare_round1.py runs/quick                      # the four synthesis samplers
    python scripts/compare_round1.py runs/quick --variants finetune=segmenter.finetune=true \
        fresh=segmenter.finetune=false
"""
import argparse
import json
import shutil
from pathlib import Path

import yaml

from vesselfast.pipeline.config import dump, from_dict, resolve
from vesselfast.pipeline.run import run_pipeline

SHARED = ("pretrain_source", "pretrain_target", "invert", "synthesize_0", "segmenter_0", "baseline",
          "baseline_histmatch", "pseudo_label_1", "target_generator_1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--variants", nargs="+", default=[f"{s}=synthesis.sampler={s}" for s in
                                                      ("ddim_latent", "ddim_noise", "ddpm_latent", "ddpm_noise")])
    ap.add_argument("--out", type=Path, help="default: RUN-round1")
    args = ap.parse_args()
    base = from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    stages = json.loads((args.run / "stages.json").read_text())
    metrics = json.loads((args.run / "metrics.json").read_text())
    out_root = args.out or args.run.with_name(args.run.name + "-round1")
    rows = []
    for variant in args.variants:
        name, _, sets = variant.partition("=")
        cfg = resolve(base.preset, str(args.run / "config.yaml"), ["rounds=1"] + sets.split(","))
        d = out_root / name
        if not (d / "config.yaml").exists():
            (d / "ckpt").mkdir(parents=True, exist_ok=True)
            for s in SHARED:
                shutil.copy2(args.run / "ckpt" / f"{s}.pt", d / "ckpt" / f"{s}.pt")
            (d / "stages.json").write_text(json.dumps({s: stages[s] for s in SHARED}, indent=2))
            kept = {k: v for k, v in metrics["target_test"].items() if k in ("baseline", "baseline_histmatch", "iter0")}
            (d / "metrics.json").write_text(json.dumps({"target_test": kept}))
            (d / "config.yaml").write_text(dump(cfg))
        res = run_pipeline(cfg, str(d))
        info = json.loads((d / "stages.json").read_text())["synthesize_1"]
        rows.append((name, res["iter1"]["dsc"], res["iter1"]["dsc_std"], info["unet_evals_per_image"],
                     info["seconds"]))
    print("| variant (round 1) | DSC iter1 | std | U-Net evals / image | synthesis s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]} | {r[4]:.1f} |")
    print(f"(base: {base.preset} preset; iter0 DSC {metrics['target_test']['iter0']['dsc']:.4f})")


if __name__ == "__main__":
    main()
