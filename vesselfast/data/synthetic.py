"""Built-in synthetic domains: procedural retinal-like vessel trees rendered as fundus-like RGB (source) and
OCTA-like grey images (target). Deterministic by seed, no downloads, a few ms per image.

Geometry is drawn in pixel units of a 256-pixel image and scaled with ``size``; at the default size 256 the
labelled mean vessel width (area / skeleton length) is 1.73 px (fundus) and 1.82 px (OCTA), the calibre of
the OCTA-500 3M large-vessel labels (1.69 px by the same measure), so both domains work at scale 1.0.

- Tree: random walkers that taper, curve smoothly, branch by Murray's law (r^3 = r1^3 + r2^3) and cross
  each other. Fundus: four arcades leaving an optic disc, bending around the macula. OCTA: vessels
  entering from the border and ending around a dark foveal avascular zone (FAZ).
- Fundus render: orange-red background, illumination fall-off, choroidal low-frequency texture, bright
  optic disc, darker macula, vessels darker (strongest in green), blur, noise, circular field of view.
- OCTA render: dark background, bright vessels whose brightness grows with calibre, a dense capillary net
  (warped Voronoi edges over band-pass ridges) that is NOT in the label (as OCTA-500's large-vessel
  labels), speckle, occasional motion stripes.
Rendering is supersampled 4x and area-averaged; the label is vessel coverage >= 0.5.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np

from vesselfast.errors import UserError

SS = 4  # supersampling factor of the vessel rasteriser
ROLE_ID = {"source": 1, "target": 2}
SPLIT_ID = {"train": 0, "val": 1, "test": 2, "all": 3}
DEFAULT_SIZE = 256


def _cv2():
    import cv2

    cv2.setNumThreads(1)
    return cv2


def sample_rng(seed: int, role: str, split: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, role, split, index): the i-th image does not depend on n."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, ROLE_ID[role], SPLIT_ID[split], int(index)])
    return np.random.default_rng(ss)


# ------------------------------------------------------------------------------------------------- trees

def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _grow(rng: np.random.Generator, roots, size: int, *, w_min: float, step: float, taper: float,
          p_branch: float, curv: float, steer, alive, max_segments: int = 4000) -> np.ndarray:
    """Random-walk vessel tree. roots: (x, y, theta, width, bias) in pixels. Returns float32 [N, 5]
    segments (x0, y0, x1, y1, width)."""
    segs: List[Tuple[float, float, float, float, float]] = []
    stack = list(roots)
    normal = rng.standard_normal(8192).tolist()
    unif = rng.random(8192).tolist()
    ni = ui = 0
    while stack and len(segs) < max_segments:
        x, y, th, w, bias = stack.pop()
        for t in range(400):
            if w < w_min or len(segs) >= max_segments:
                break
            th += curv * normal[ni % 8192] + bias + steer(x, y, th)
            ni += 1
            bias *= 0.93
            ds = step * (0.6 + 0.4 * min(w, 3.0) / 3.0)
            nx, ny = x + ds * math.cos(th), y + ds * math.sin(th)
            segs.append((x, y, nx, ny, w))
            x, y = nx, ny
            if not alive(x, y):
                break
            w *= taper
            if unif[ui % 8192] < p_branch and w > 1.4 * w_min:
                r = 0.45 + 0.5 * unif[(ui + 1) % 8192]
                k = (1.0 + r ** 3) ** (-1.0 / 3.0)
                w_child, w = w * r * k, w * k
                ang = (0.45 + 0.6 * unif[(ui + 2) % 8192]) * (1 if unif[(ui + 3) % 8192] < 0.5 else -1)
                stack.append((x, y, th + ang, w_child, 0.0))
                th -= 0.3 * ang
                ui += 4
            ui += 1
    return np.asarray(segs, np.float32).reshape(-1, 5)


def _rasterise(segs: np.ndarray, values: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Max-composited value map and coverage, both float32 [size, size], 4x supersampled."""
    cv2 = _cv2()
    big = size * SS
    canvas = np.zeros((big, big), np.float32)
    order = np.argsort(values, kind="stable")
    shift = 4
    f = float(SS * (1 << shift))
    pts = np.round(segs[:, :4] * f).astype(np.int64)
    thick = np.maximum(1, np.round(segs[:, 4] * SS)).astype(np.int64)
    for i in order:
        x0, y0, x1, y1 = pts[i]
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), float(values[i]), int(thick[i]), cv2.LINE_8, shift)
    cov = cv2.resize((canvas > 0).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    val = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return val, cov


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a cells x cells random grid upsampled bicubically."""
    cv2 = _cv2()
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC)


def _grid(size: int):
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :], c[:, None]


# ------------------------------------------------------------------------------------------------ fundus

def synth_fundus(rng: np.random.Generator, size: int = DEFAULT_SIZE):
    """-> (rgb uint8 [S,S,3], mask uint8 {0,1} [S,S], fov bool [S,S])."""
    cv2 = _cv2()
    k = size / 256.0
    S = float(size)
    cx, cy = S / 2, S / 2
    R = 0.47 * S
    side = 1 if rng.random() < 0.5 else -1            # right / left eye: disc on the right / left
    dx, dy = cx + side * (0.22 + 0.03 * rng.random()) * S, cy + (rng.random() - 0.5) * 0.08 * S
    fx, fy = cx - side * (0.12 + 0.03 * rng.random()) * S, cy + (rng.random() - 0.5) * 0.05 * S
    r_disc = (0.062 + 0.01 * rng.random()) * S

    def alive(x, y):
        return (x - cx) ** 2 + (y - cy) ** 2 < (R + 4 * k) ** 2

    def steer(x, y, th):
        # drift outwards from the disc; keep off the fovea
        radial = math.atan2(y - dy, x - dx)
        s = 0.04 * _wrap(radial - th)
        d2 = (x - fx) ** 2 + (y - fy) ** 2
        if d2 < (0.09 * S) ** 2:
            away = math.atan2(y - fy, x - fx)
            s += 0.25 * _wrap(away - th)
        return s

    roots = []
    w0 = 5.0 * k
    for up in (-1, 1):
        # temporal arcades: leave the disc up/down and bend towards the fovea
        th = math.atan2(up * 1.0, (-side) * (0.5 + 0.3 * rng.random()))
        roots.append((dx, dy, th, w0 * (0.9 + 0.2 * rng.random()), up * side * (0.05 + 0.03 * rng.random())))
        # nasal vessels: shorter, thinner
        th_n = math.atan2(up * 0.8, side * 1.0)
        roots.append((dx, dy, th_n, w0 * (0.6 + 0.15 * rng.random()), 0.0))
    for _ in range(int(rng.integers(1, 3))):
        th = rng.uniform(-math.pi, math.pi)
        roots.append((dx, dy, th, w0 * (0.4 + 0.15 * rng.random()), 0.0))
    segs = _grow(rng, roots, size, w_min=1.2 * k, step=3.0 * k, taper=0.992, p_branch=0.09,
                 curv=0.12, steer=steer, alive=alive)
    w = segs[:, 4] / k
    contrast = np.clip(0.15 + 0.17 * w, 0.3, 1.0)   # thin vessels are faint (partial volume).astype(np.float32)
    val, cov = _rasterise(segs, contrast, size)

    xx, yy = _grid(size)
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / R ** 2
    fov = r2 < 1.0
    ox, oy = (rng.random(2) - 0.5) * 0.4
    illum = 1.0 - (0.35 + 0.2 * rng.random()) * (((xx - cx) / R - ox) ** 2 + ((yy - cy) / R - oy) ** 2)
    chor = _smooth_noise(rng, size, 12)
    fine = _smooth_noise(rng, size, 48)
    gain = 0.8 + 0.7 * rng.random()                  # exposure: green median ~55-120 of 255, as DRIVE/CHASE_DB1
    base = np.array([0.85, 0.46, 0.18], np.float32) * gain * (0.85 + 0.3 * rng.random(3)).astype(np.float32)
    disc = np.clip(1.2 - np.sqrt((xx - dx) ** 2 + (yy - dy) ** 2) / r_disc, 0, 1) ** 1.5
    mac = np.exp(-((xx - fx) ** 2 + (yy - fy) ** 2) / (2 * (0.07 * S) ** 2))
    absorb = np.array([0.12, 0.5, 0.35], np.float32) * (0.8 + 0.4 * rng.random())
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        ch = base[c] * illum * (1 + (0.10, 0.06, 0.04)[c] * chor + 0.03 * fine)
        ch = ch * (1 - (0.25, 0.35, 0.2)[c] * mac) + (0.18, 0.42, 0.25)[c] * disc
        ch = ch * (1 - absorb[c] * val)
        img[..., c] = ch
    sigma = (0.8 + 0.3 * rng.random()) * k
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.standard_normal(img.shape).astype(np.float32) * 0.012
    img[~fov] = 0.0
    rgb = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    mask = ((cov >= 0.5) & fov).astype(np.uint8)
    return rgb, mask, fov


# -------------------------------------------------------------------------------------------------- OCTA

def _voronoi_net(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Edges of a Voronoi tessellation (seed spacing ~cell px), warped by a smooth displacement field,
    with random gaps: float32 [S,S] in [0, 1]."""
    cv2 = _cv2()
    n_pts = max(4, int((size / cell) ** 2))
    seeds = np.ones((size, size), np.uint8)
    ys, xs = rng.integers(0, size, n_pts), rng.integers(0, size, n_pts)
    seeds[ys, xs] = 0
    _, lab = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    edge = np.zeros((size, size), np.float32)
    edge[1:, :] += lab[1:, :] != lab[:-1, :]
    edge[:, 1:] += lab[:, 1:] != lab[:, :-1]
    edge = np.minimum(edge, 1.0)
    amp = 0.35 * cell
    cells = max(2, int(size / (3 * cell)))
    dx = _smooth_noise(rng, size, cells) * amp
    dy = _smooth_noise(rng, size, cells) * amp
    xx, yy = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    edge = cv2.remap(edge, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    gaps = _smooth_noise(rng, size, max(2, int(size / cell))) > -0.6
    return np.clip(edge * 1.4, 0, 1) * gaps


def _ridge_texture(rng: np.random.Generator, size: int, k: float) -> np.ndarray:
    """Fine wavy ridges: the zero set of band-pass noise."""
    cv2 = _cv2()
    n = rng.standard_normal((size, size)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), 1.5 * k) - cv2.GaussianBlur(n, (0, 0), 4.0 * k)
    n /= float(n.std()) + 1e-6
    return np.exp(-(n / 0.3) ** 2)


def synth_octa(rng: np.random.Generator, size: int = DEFAULT_SIZE):
    """-> (grey uint8 [S,S], large-vessel mask uint8 {0,1} [S,S]); capillaries are not labelled."""
    cv2 = _cv2()
    k = size / 256.0
    S = float(size)
    fx, fy = S / 2 + (rng.random() - 0.5) * 0.1 * S, S / 2 + (rng.random() - 0.5) * 0.1 * S
    r_faz = (0.055 + 0.03 * rng.random()) * S
    r_stop = (1.8 + 1.2 * rng.random()) * r_faz   # large vessels end well before the FAZ

    def alive(x, y):
        return -6 * k < x < S + 6 * k and -6 * k < y < S + 6 * k and (x - fx) ** 2 + (y - fy) ** 2 > r_stop ** 2

    def steer(x, y, th):
        return 0.02 * _wrap(math.atan2(fy - y, fx - x) - th)

    roots = []
    n_roots = int(rng.integers(5, 8))
    phase = rng.uniform(0, 2 * math.pi)
    for i in range(n_roots):
        a = phase + 2 * math.pi * (i + 0.35 * rng.random()) / n_roots
        # start on the border square, heading inwards
        t = max(abs(math.cos(a)), abs(math.sin(a)))
        x = fx + (0.75 * S) * math.cos(a) / t
        y = fy + (0.75 * S) * math.sin(a) / t
        x, y = min(max(x, -2 * k), S + 2 * k), min(max(y, -2 * k), S + 2 * k)
        th = math.atan2(fy - y, fx - x) + rng.normal(0, 0.35)
        roots.append((x, y, th, (3.4 + 2.4 * rng.random()) * k, rng.normal(0, 0.03)))
    segs = _grow(rng, roots, size, w_min=1.3 * k, step=3.0 * k, taper=0.992, p_branch=0.07,
                 curv=0.1, steer=steer, alive=alive)
    w = segs[:, 4] / k
    bright = np.clip(0.7 + 0.08 * w, 0.75, 1.0).astype(np.float32)
    val, cov = _rasterise(segs, bright, size)

    xx, yy = _grid(size)
    dfaz = np.sqrt((xx - fx) ** 2 + (yy - fy) ** 2)
    faz = np.clip((dfaz - r_faz) / (0.3 * r_faz), 0, 1)          # 0 inside the FAZ, 1 outside
    # capillary mesh, unlabelled: a warped Voronoi net (polygonal cells of ~9 px, connected 1-px segments)
    # over a finer band-pass ridge texture
    mesh = np.maximum(_voronoi_net(rng, size, 9.0 * k), 0.6 * _ridge_texture(rng, size, k))
    density = 0.85 + 0.2 * _smooth_noise(rng, size, 8)
    cap = (0.75 + 0.2 * rng.random()) * mesh * np.clip(density, 0.3, 1.2) * faz
    bg = 0.08 + 0.04 * _smooth_noise(rng, size, 10) * faz
    img = np.maximum(bg + cap, val)
    # speckle (multiplicative gamma) and additive noise
    shape = 8.0 + 6.0 * rng.random()
    img = img * rng.gamma(shape, 1.0 / shape, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 0.6 * k)
    img += rng.standard_normal(img.shape).astype(np.float32) * 0.02
    # occasional motion artefacts: bright horizontal stripes and a row shift
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 3))):
            y0 = int(rng.integers(0, size - 2))
            h = int(max(1, round((1 + 3 * rng.random()) * k)))
            img[y0:y0 + h] = img[y0:y0 + h] * (1.3 + 0.5 * rng.random()) + 0.1
    if rng.random() < 0.3:
        y0 = int(rng.integers(size // 4, 3 * size // 4))
        sh = int(rng.integers(2, 6) * k)
        img[y0:] = np.roll(img[y0:], sh, axis=1)
        cov = np.concatenate([cov[:y0], np.roll(cov[y0:], sh, axis=1)])
    grey = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    mask = (cov >= 0.5).astype(np.uint8)
    return grey, mask


# ------------------------------------------------------------------------------------------------ domain

def builtin_domain(role: str, split: str = "train", n: int = 40, size: int = DEFAULT_SIZE, seed: int = 0, *,
                   read_labels: Optional[bool] = None, channel: str = "green", clahe: Optional[bool] = None,
                   scale: float = 1.0):
    """The built-in synthetic data generated in memory -> list[Sample]. 'source' = fundus-like RGB,
    preprocessed exactly like real fundus (:func:`preprocess_source`); 'target' = OCTA-like
    (:func:`preprocess_target`). Labels: always for source; for target only for val/test/all
    (``read_labels=None``); target train labels are never returned (``read_labels=True`` there raises)."""
    from vesselfast.data.dataset import Sample
    from vesselfast.data.preprocess import CLAHE_DEFAULT, preprocess_source, preprocess_target

    if role not in ROLE_ID:
        raise UserError(f"role must be 'source' or 'target', got {role!r}")
    if split not in SPLIT_ID:
        raise UserError(f"split must be one of train, val, test, all, got {split!r}")
    if int(size) < 32:
        raise UserError(f"size {size} is too small for the synthetic domain; use 32 or more (default 256)")
    if int(n) < 0:
        raise UserError(f"n must be >= 0, got {n}")
    if role == "target" and split == "train":
        if read_labels:
            raise UserError("target training labels are never used: call with read_labels=False")
        read_labels = False
    elif read_labels is None:
        read_labels = True
    clahe = CLAHE_DEFAULT if clahe is None else clahe
    out = []
    for i in range(int(n)):
        rng = sample_rng(seed, role, split, i)
        name = f"synth_{role}_{split}_{seed}_{i:04d}"
        if role == "source":
            rgb, mask, fov = synth_fundus(rng, int(size))
            img, m, f = preprocess_source(rgb, mask, fov, channel=channel, clahe=clahe, scale=scale)
        else:
            grey, mask = synth_octa(rng, int(size))
            img, m, f = preprocess_target(grey, mask, clahe=clahe, scale=scale)
        out.append(Sample(name, img, m if read_labels else None, f, f"builtin:{role}/{split}/{seed}/{i}",
                          layout="synthetic", modality="fundus" if role == "source" else "octa", split=split,
                          scale=float(scale)))
    return out


def raw_pair(role: str, split: str, index: int, size: int = DEFAULT_SIZE, seed: int = 0):
    """Unpreprocessed synthetic sample: fundus -> (rgb, mask, fov); OCTA -> (grey, mask, None)."""
    rng = sample_rng(seed, role, split, index)
    if role == "source":
        return synth_fundus(rng, size)
    g, m = synth_octa(rng, size)
    return g, m, None
