"""Vessel biomarkers of a binary vessel mask: the per-image quantities clinical OCTA studies report.

Every function takes a boolean ``[H, W]`` mask (True = vessel) and, where lengths are involved, an optional
pixel size in micrometres per pixel. Without a pixel size, lengths are in pixels; with one, lengths are in
um or mm and the key names say which (``mean_branch_length_px`` vs ``mean_branch_length_um``).
:func:`measure` returns all of them as one ordered dict, the row that ``vesselfast measure`` writes.

Definitions (A = H * W, the image area; docs/BIOMARKERS.md has the formulas and the literature):

- vessel area density (VAD) = vessel pixels / A, a fraction in [0, 1] (no unit).
- skeleton: ``skimage.morphology.skeletonize`` of the mask (one-pixel-wide centre lines).
- skeleton length = the summed length of the skeleton's branches as skan measures them: 1 per horizontal or
  vertical step between neighbouring skeleton pixels, sqrt(2) per diagonal step. An isolated single skeleton
  pixel (the skeleton of a round blob) has no extent and adds 0.
- vessel skeleton (length) density (VSD) = skeleton length / A: 1/px, or mm/mm^2 = 1/mm.
- vessel diameter index (VDI) = vessel area / skeleton length: the mean vessel width, px or um.
- fractal dimension: box counting on the mask (:func:`fractal_dimension` states the box sizes and the fit).
- branches and junctions from skan's skeleton graph (:func:`branch_statistics`): number of branches, number
  of junctions, mean branch length (px or um) and mean tortuosity (branch path length / distance between
  the branch's two end points, no unit, >= 1).

Undefined values are NaN: on an empty mask VAD, skeleton length, VSD, branches and junctions are 0 and VDI,
fractal dimension, mean branch length and mean tortuosity are NaN; VDI is also NaN when the skeleton has no
length (only single-pixel blobs), and the mean tortuosity when every branch is a closed loop.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import numpy as np

NAN = float("nan")


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D [H, W] mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_pixel_size(pixel_size_um: Optional[float]) -> None:
    if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel size must be a positive number of micrometres, got {pixel_size_um}")


def skeleton(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide centre lines of ``mask`` (bool [H, W]), by ``skimage.morphology.skeletonize``."""
    from skimage.morphology import skeletonize

    return skeletonize(_check_mask(mask))


def vessel_area_density(mask: np.ndarray) -> float:
    """VAD: vessel pixels / all pixels, a fraction in [0, 1]; 0 for an empty mask."""
    mask = _check_mask(mask)
    return float(mask.mean()) if mask.size else 0.0


def box_sizes(shape) -> List[int]:
    """Box sizes used by :func:`fractal_dimension`: 1, 2, 4, ... up to the largest power of two that is
    at most a quarter of the shorter image side (so that the largest boxes still tile the image at least
    4 x 4 times); for a 304 x 304 image 1, 2, 4, 8, 16, 32, 64. At least sizes 1 and 2."""
    largest = max(2, min(shape) // 4)
    return [2 ** k for k in range(int(math.log2(largest)) + 1)]


def box_counts(mask: np.ndarray, sizes: List[int]) -> np.ndarray:
    """For each box size s: the number of boxes of a grid of s x s boxes, anchored at the top-left corner
    and covering the image (the last row and column of boxes may be cut by the image edge), that hold at
    least one vessel pixel."""
    mask = _check_mask(mask)
    h, w = mask.shape
    counts = []
    for s in sizes:
        padded = np.zeros((-(-h // s) * s, -(-w // s) * s), dtype=bool)
        padded[:h, :w] = mask
        boxes = padded.reshape(padded.shape[0] // s, s, padded.shape[1] // s, s).any(axis=(1, 3))
        counts.append(int(boxes.sum()))
    return np.asarray(counts)


def fractal_dimension(mask: np.ndarray) -> float:
    """Box-counting (Minkowski-Bouligand) dimension of the vessel mask (not of its skeleton).

    N(s) = :func:`box_counts` for the box sizes s of :func:`box_sizes` (powers of two from 1 px to a quarter
    of the shorter side); the dimension is the slope of the ordinary least-squares line through the points
    (log(1/s), log N(s)), all sizes weighted equally. A straight one-pixel line gives 1, a filled square 2,
    a single pixel 0. NaN for an empty mask."""
    mask = _check_mask(mask)
    if not mask.any():
        return NAN
    sizes = box_sizes(mask.shape)
    counts = box_counts(mask, sizes)
    slope = np.polyfit(np.log(1.0 / np.asarray(sizes, dtype=float)), np.log(counts), 1)[0]
    return float(slope)


def branch_statistics(skel: np.ndarray) -> Dict[str, float]:
    """Branch statistics of a skeleton (bool [H, W], e.g. from :func:`skeleton`), computed by skan.

    skan (``skan.Skeleton`` / ``skan.summarize``) turns the skeleton pixels into a graph (8-connected
    neighbours, edges weighted 1 or sqrt(2)), replaces clusters of adjacent junction pixels by their minimum
    spanning tree, and splits the graph into branches: pixel paths between two nodes whose degree is not 2
    (end points, degree 1; junctions, degree >= 3), or closed loops. For each branch it gives the path length
    (``branch_distance``) and the straight distance between its two end nodes (``euclidean_distance``).

    On top of skan's table:

    - junctions = groups of 8-connected skeleton nodes of degree >= 3 (two junction nodes that touch are one
      junction: a vessel crossing skeletonised into a small cluster counts once);
    - branches = skan's branches, less the one-step links between two nodes of the same junction group;
    - mean branch length = the mean path length of those branches (px, or um with a pixel size);
    - mean tortuosity = the mean of path length / end-point distance over those branches that are not
      closed loops (a straight branch has 1).

    Returns ``branches``, ``junctions``, ``skeleton_length`` (the sum of all skan branch lengths, px) and
    ``mean_branch_length`` (px) and ``mean_tortuosity``; NaN means where there is no branch to average.
    """
    from scipy import ndimage as ndi

    skel = _check_mask(skel)
    none = {"branches": 0, "junctions": 0, "skeleton_length": 0.0, "mean_branch_length": NAN,
            "mean_tortuosity": NAN}
    if skel.sum() < 2:  # skan needs at least one edge; one pixel has no branch and no length
        return none
    from skan import Skeleton, summarize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skan / numba deprecation chatter must not reach the CLI's output
        graph = Skeleton(skel)
        table = summarize(graph, separator="_")
    if len(table) == 0:
        return none
    src = table["node_id_src"].to_numpy()
    dst = table["node_id_dst"].to_numpy()
    length = table["branch_distance"].to_numpy(dtype=float)
    chord = table["euclidean_distance"].to_numpy(dtype=float)

    # junction groups: label the image of junction nodes (degree >= 3) with 8-connectivity
    coords = np.round(graph.coordinates).astype(int)
    junction_nodes = np.flatnonzero(graph.degrees >= 3)
    node_image = np.zeros(skel.shape, dtype=bool)
    node_image[coords[junction_nodes, 0], coords[junction_nodes, 1]] = True
    groups, n_junctions = ndi.label(node_image, structure=np.ones((3, 3), dtype=int))
    group_of = groups[coords[:, 0], coords[:, 1]]
    inner_link = (src != dst) & (group_of[src] > 0) & (group_of[src] == group_of[dst])
    keep = ~inner_link
    lengths = length[keep]
    open_branch = keep & (chord > 0)
    tortuosity = length[open_branch] / chord[open_branch]
    return {
        "branches": int(keep.sum()),
        "junctions": int(n_junctions),
        "skeleton_length": float(length.sum()),
        "mean_branch_length": float(lengths.mean()) if lengths.size else NAN,
        "mean_tortuosity": float(tortuosity.mean()) if tortuosity.size else NAN,
    }


def measure(mask: np.ndarray, pixel_size_um: Optional[float] = None) -> Dict[str, float]:
    """All biomarkers of one vessel mask, as an ordered dict whose keys carry the units.

    Without ``pixel_size_um`` (micrometres per pixel): ``vessel_area_px2``, ``skeleton_length_px``,
    ``skeleton_density_per_px`` (skeleton px per image px^2), ``vessel_diameter_index_px``,
    ``mean_branch_length_px``. With it: ``vessel_area_mm2``, ``skeleton_length_mm``, ``skeleton_density_per_mm``
    (mm of skeleton per mm^2 of image), ``vessel_diameter_index_um``, ``mean_branch_length_um``, and
    ``pixel_size_um`` itself. Always: ``height_px``, ``width_px``, ``vessel_area_density`` (fraction),
    ``fractal_dimension``, ``branches``, ``junctions``, ``mean_tortuosity``. See the module docstring for
    the definitions and the values on an empty mask."""
    _check_pixel_size(pixel_size_um)
    mask = _check_mask(mask)
    h, w = mask.shape
    stats = branch_statistics(skeleton(mask))
    area_px = float(mask.sum())
    length_px = stats["skeleton_length"]
    vdi_px = area_px / length_px if length_px > 0 else NAN
    density_px = length_px / (h * w)
    row: Dict[str, float] = {"height_px": h, "width_px": w}
    if pixel_size_um is None:
        row.update(vessel_area_density=vessel_area_density(mask), vessel_area_px2=area_px, skeleton_length_px=length_px,
                   skeleton_density_per_px=density_px, vessel_diameter_index_px=vdi_px)
    else:
        mm = pixel_size_um / 1000.0
        row.update(pixel_size_um=pixel_size_um, vessel_area_density=vessel_area_density(mask),
                   vessel_area_mm2=area_px * mm * mm, skeleton_length_mm=length_px * mm,
                   skeleton_density_per_mm=density_px / mm, vessel_diameter_index_um=vdi_px * pixel_size_um)
    row["fractal_dimension"] = fractal_dimension(mask)
    row["branches"] = stats["branches"]
    row["junctions"] = stats["junctions"]
    if pixel_size_um is None:
        row["mean_branch_length_px"] = stats["mean_branch_length"]
    else:
        row["mean_branch_length_um"] = stats["mean_branch_length"] * pixel_size_um
    row["mean_tortuosity"] = stats["mean_tortuosity"]
    return row
