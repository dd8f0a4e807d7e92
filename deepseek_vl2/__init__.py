"""DeepSeek-VL2 vision-language models on current PyTorch and transformers.

Importing the package registers its config, model and processor with transformers' Auto classes
(so ``AutoModelForCausalLM.from_pretrained`` reads published checkpoints) and prints nothing.
"""

from .models import (
    DeepseekV2Config,
    DeepseekVLV2Config,
    DeepseekVLV2ForCausalLM,
    DeepseekVLV2Processor,
    MlpProjectorConfig,
    VisionEncoderConfig,
)

__version__ = "0.1.0"

__all__ = [
    "DeepseekV2Config",
    "DeepseekVLV2Config",
    "DeepseekVLV2ForCausalLM",
    "DeepseekVLV2Processor",
    "MlpProjectorConfig",
    "VisionEncoderConfig",
]
