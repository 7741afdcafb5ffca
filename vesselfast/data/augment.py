"""Training-time augmentation shared by the generators and the segmenters."""
from __future__ import annotations

import torch


def augment(g: torch.Generator, *tensors: torch.Tensor):
    """The same random flip and 90-degree rotation for every tensor (vessels have no orientation)."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    out = []
    for t in tensors:
        t = torch.rot90(t, k, (-2, -1))
        out.append(t.flip(-1) if flip else t)
    return out
