"""Networks: the eps-predicting generator U-Net and the vessel segmenter U-Net."""
from vesselfast.models.ema import EMA  # noqa: F401
from vesselfast.models.generator import GeneratorConfig, GeneratorUNet, generator_from_dict, timestep_embedding  # noqa: F401
from vesselfast.models.precision import GradScaling, autocast, to_memory_format  # noqa: F401
from vesselfast.models.segmenter import SegmenterUNet  # noqa: F401
