"""Data: built-in synthetic domains, real dataset readers (auto-detected layouts), preprocessing, crops,
validation. See docs/DATA.md.

Public interface used by the pipeline::

    from vesselfast.data import (Sample, load_domain, builtin_domain, preprocess_source, preprocess_target,
                                 preprocessing_spec, random_crops, thick_mask, check_paths)
"""
from vesselfast.data.check import check_paths, format_report
from vesselfast.data.crops import random_crops, thick_mask
from vesselfast.data.dataset import Sample, load_domain
from vesselfast.data.layouts import detect as detect_layout
from vesselfast.data.preprocess import (CLAHE_DEFAULT, apply_spec, preprocess_source, preprocess_target,
                                        preprocessing_spec)
from vesselfast.data.synthetic import builtin_domain

__all__ = [
    "Sample", "load_domain", "builtin_domain", "preprocess_source", "preprocess_target", "preprocessing_spec",
    "apply_spec", "random_crops", "thick_mask", "check_paths", "format_report", "detect_layout",
    "CLAHE_DEFAULT",
]
