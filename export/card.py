"""The model card an exported segmenter carries (metadata key ``model_card``, docs/MODEL_CARD.md): what it
was trained on and under which terms, how to re-create it, how well it did on its target test split and
what it is not for. Gathered at export from the run directory the segmenter came from, when there is one.
"""
from __future__ import annotations

import datetime
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import yaml

TERMS = ("Research use only. The model inherits the terms of its training data: for DRIVE, CHASE_DB1 and "
         "OCTA-500 (the datasets of the real presets) research use, citing the dataset papers; check the terms "
         "of any other data it was trained on.")
NOT_FOR = ("Not a medical device: not for diagnosis, screening or treatment decisions. Segments the large "
           "vessels of OCTA en-face projections like its training target (device, layer, field of view, "
           "pixel size); not validated on other devices, layers or pixel sizes, on pathology its training "
           "images lack, nor on colour fundus photographs. Check flagged images (quality) by eye.")


def run_of(model: str) -> Optional[Path]:
    """The run directory of ``model`` (itself, or the folder above a ``ckpt/`` checkpoint), when it has a
    config.yaml; else None."""
    path = Path(model)
    for folder in (path, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def load_config(run: Path):
    """The run's RunConfig (config.yaml as the schema reads it)."""
    from vesselfast.pipeline.config import from_dict

    return from_dict(yaml.safe_load((run / "config.yaml").read_text()) or {})


def recreate_command(cfg) -> str:
    """``vesselfast train ...`` that resolves to the run's config: its preset, folders, and a ``--set``
    for the seed and every key that differs from what the preset and folders give."""
    from vesselfast.pipeline.config import resolve, to_dict

    data = cfg.data
    folders = {"source": list(data.source), "target": data.target, "target_test": data.target_test}
    base = to_dict(resolve(cfg.preset, overrides={"data": folders}))
    sets = [f"seed={cfg.seed}"]
    sets += [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in _flat(to_dict(cfg)).items() if k != "seed" and _flat(base).get(k) != v]
    argv = ["vesselfast", "train", "--preset", cfg.preset, "--source", *data.source, "--target", data.target]
    if data.target_test:
        argv += ["--target-test", data.target_test]
    for item in sets:
        argv += ["--set", item]
    return " ".join(shlex.quote(a) for a in argv + ["--out", f"runs/{cfg.preset}"])


def _flat(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_data(cfg) -> str:
    data = cfg.data

    def named(folder: str, kind: str) -> str:
        return f"the built-in synthetic {kind} images" if folder == "builtin" else Path(folder).name

    test = data.target_test or data.target
    return (f"source (labelled colour fundus): {', '.join(named(f, 'fundus') for f in data.source)}; target: "
            f"{named(data.target, 'OCTA')}, train split, images only (labels never read); evaluated on "
            f"{named(test, 'OCTA')}, test split; preset {cfg.preset}")


def target_test_scores(run: Path, stage: str, cfg) -> Optional[Dict]:
    """DSC / AUC / AHD of ``stage`` (e.g. segmenter_3) on the run's target test split, from metrics.json."""
    import json

    from vesselfast.pipeline.keys import metric_key

    key = metric_key(stage)
    path = run / "metrics.json"
    if key is None or not path.is_file():
        return None
    m = (json.loads(path.read_text()).get("target_test") or {}).get(key)
    if not m:
        return None
    out = {"model": key, "test_set": f"{cfg.data.target_test or cfg.data.target} (test split)",
           "n_images": m.get("n_images"), "ahd_unit": "px"}
    for name in ("dsc", "auc", "ahd"):
        out[name] = m.get(name)
        out[f"{name}_std"] = m.get(f"{name}_std")
    return out


def git_commit() -> Optional[str]:
    """HEAD of the git checkout vesselfast runs from (``-dirty`` with uncommitted changes), else None."""
    import vesselfast

    root = Path(vesselfast.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def model_card(name: str, run: Optional[Path], stage: str, cfg=None, terms: Optional[str] = None,
               not_for: Optional[str] = None, training: Optional[str] = None) -> Dict:
    """The ``model_card`` metadata block. Without a run directory the training data, command and scores
    are unknown (None) unless given."""
    card: Dict = {"name": name, "stage": stage, "terms": terms or TERMS, "not_for": not_for or NOT_FOR,
                  "commit": git_commit(),
                  "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "training_data": training, "recreate": None, "target_test": None}
    if run is not None and cfg is not None:
        card["training_data"] = training or training_data(cfg)
        card["recreate"] = {"command": recreate_command(cfg), "seed": cfg.seed}
        card["target_test"] = target_test_scores(run, stage, cfg)
    return card


def card_lines(meta: Dict) -> List[str]:
    """The card of an exported model's metadata as short lines (for export's report)."""
    card = meta.get("model_card") or {}
    lines = [f"model card: {card.get('name')} ({card.get('stage')}), commit {card.get('commit') or 'unknown'}"
             + (f", {meta['pixel_size_um']:g} um/px" if meta.get("pixel_size_um") else ", pixel size not recorded")]
    scores = card.get("target_test")
    if scores:
        lines.append(f"  {scores['model']} on {scores['test_set']}: DSC {_num(scores.get('dsc'))}, AUC "
                     f"{_num(scores.get('auc'))}, AHD {_num(scores.get('ahd'), 2)} px ({scores.get('n_images')} images)")
    return lines


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
