"""Networks: the eps-predicting generator U-Net and the vessel segmenter U-Net."""
from vesselfast.models.ema import EMA  # noqa: F401
from vesselfast.models.generator import (GeneratorArch, GeneratorUNet, arch_dict, generator_from_dict,  # noqa: F401
                                        timestep_embedding)
from vesselfast.models.precision import GradScaling, autocast, to_memory_format  # noqa: F401
from vesselfast.models.segmenter import SegmenterUNet  # noqa: F401
