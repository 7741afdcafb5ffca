"""The shipped segmenter (vesselfast/shipped, docs/MODELS.md): it is installed with the package, loads, its
metadata is complete, ``segment`` uses it without --model, and on the OCTA-500 3M test images it scores
what its card says (skipped without ../shared)."""
import json

import numpy as np
import pytest

from vesselfast import shipped
from vesselfast.cli import main
from vesselfast.export import Segmenter
from vesselfast.export.metadata import read_onnx


def test_shipped_file_is_installed_and_its_card_complete():
    path = shipped.model_path()
    assert path.stat().st_size < 32 * 2 ** 20  # stays small enough to ship in the wheel
    meta = read_onnx(path)
    assert meta["pixel_size_um"] == pytest.approx(3000 / 304, rel=1e-3)
    card = meta["model_card"]
    assert card["name"] == shipped.NAME
    assert "DRIVE" in card["training_data"] and "CHASE_DB1" in card["training_data"]
    assert "labels never read" in card["training_data"]
    assert card["recreate"]["seed"] == 0 and "--preset real-cpu" in card["recreate"]["command"]
    commit = card["commit"]
    assert commit and len(commit) == 40, commit  # a clean checkout's HEAD, not "-dirty"
    scores = card["target_test"]
    assert scores["n_images"] == 50 and "OCTA-500_3M" in scores["test_set"]
    assert 0.5 < scores["dsc"] < 1 and 0.5 < scores["auc"] <= 1 and scores["ahd"] >= 0
    assert card["terms"] and card["not_for"]
    ref = meta["quality_reference"]
    assert ref["n_images"] == 140 and "labels unread" in ref["images"]


def test_segment_without_model_uses_the_shipped_one(tmp_path, capsys):
    import cv2

    rng = np.random.default_rng(0)
    scan = (rng.uniform(0, 60, (304, 304)) + 150 * (np.abs(np.arange(304) - 150) < 3)[None, :]).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "scan.png"), scan)
    assert main(["segment", str(tmp_path / "scan.png"), "--out", str(tmp_path / "out")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"model {shipped.NAME} (shipped" in first
    mask = cv2.imread(str(tmp_path / "out" / "scan_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (304, 304) and (mask[:, 148:153] > 0).mean() > 0.5  # the bright vertical vessel
    rows = (tmp_path / "out" / "segment.csv").read_text().splitlines()
    assert rows[0].startswith("image,name,width_px") and len(rows) == 2


@pytest.mark.real_data
def test_shipped_model_scores_what_its_card_says(shared_data):
    """ONNX Runtime on the raw test images (the user's path: read, preprocess from the metadata, tiles) vs
    the DSC the training run measured (in its own precision), within 0.005."""
    from vesselfast.data import load_domain
    from vesselfast.data.io import read_image
    from vesselfast.metrics import evaluate_images

    seg = Segmenter.load(str(shipped.model_path()))
    test = load_domain([str(shared_data / "octa" / "OCTA-500_3M")], "target", "test", True)
    assert len(test) == 50
    probs = [seg.predict(read_image(s.source_path)) for s in test]
    res = evaluate_images(probs, [s.mask for s in test], [s.fov for s in test], seg.threshold)
    card = seg.meta["model_card"]["target_test"]
    assert res["dsc"] == pytest.approx(card["dsc"], abs=0.005)
    assert res["auc"] == pytest.approx(card["auc"], abs=0.005)
