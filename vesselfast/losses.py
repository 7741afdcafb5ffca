"""Segmenter loss: BCE + (1 - soft Dice), as in the method's reference code.
(The generator's vessel-weighted noise loss is the fused op ``vesselfast.ops.vessel_noise_loss``.)"""
import torch
import torch.nn.functional as F


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Batch soft Dice of sigmoid(logits) against target {0,1}, [B, 1, H, W] -> scalar."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    return (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def bce_soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float()) + (1 - soft_dice(logits, target))
