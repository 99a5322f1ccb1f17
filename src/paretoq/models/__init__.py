"""Model classes paretoq adds to transformers: MiniCPM (SPEC §3), registered with the Auto classes on import."""

import logging

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from paretoq.models.minicpm import MiniCPMConfig, MiniCPMForCausalLM, MiniCPMModel

logger = logging.getLogger(__name__)


def register_minicpm() -> None:
    """Register model_type "minicpm" with AutoConfig / AutoModel / AutoModelForCausalLM; idempotent.

    If transformers itself ever ships a "minicpm" model type, its classes are kept.
    """
    if "minicpm" in CONFIG_MAPPING:
        if CONFIG_MAPPING["minicpm"] is not MiniCPMConfig:
            logger.info("transformers already provides model_type 'minicpm'; keeping its classes")
        return
    AutoConfig.register("minicpm", MiniCPMConfig)
    AutoModel.register(MiniCPMConfig, MiniCPMModel, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMConfig, MiniCPMForCausalLM, exist_ok=True)


register_minicpm()

__all__ = ["MiniCPMConfig", "MiniCPMModel", "MiniCPMForCausalLM", "register_minicpm"]
