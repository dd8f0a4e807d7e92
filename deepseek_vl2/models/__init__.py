"""Model, configuration and processor classes, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from .configuration import DeepseekV2Config, DeepseekVLV2Config, MlpProjectorConfig, VisionEncoderConfig
from .language import DeepseekV2ForCausalLM, expert_weight_conversions
from .modeling import DeepseekVLV2ForCausalLM, DeepseekVLV2PreTrainedModel
from .processing import DeepseekVLV2Processor

AutoConfig.register(DeepseekVLV2Config.model_type, DeepseekVLV2Config, exist_ok=True)
AutoModelForCausalLM.register(DeepseekVLV2Config, DeepseekVLV2ForCausalLM, exist_ok=True)
AutoProcessor.register(DeepseekVLV2Config, DeepseekVLV2Processor, exist_ok=True)
# Published checkpoints store one tensor per expert; we hold each layer's experts stacked.
register_checkpoint_conversion_mapping(DeepseekVLV2Config.model_type, expert_weight_conversions(), overwrite=True)

__all__ = [
    "DeepseekV2Config",
    "DeepseekV2ForCausalLM",
    "DeepseekVLV2Config",
    "DeepseekVLV2ForCausalLM",
    "DeepseekVLV2PreTrainedModel",
    "DeepseekVLV2Processor",
    "MlpProjectorConfig",
    "VisionEncoderConfig",
]
