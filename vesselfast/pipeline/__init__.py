"""Stages of the method (pre-training, inversion, synthesis, segmenter, co-optimisation rounds)."""
