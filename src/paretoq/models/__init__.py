"""Model classes paretoq adds to transformers: MiniCPM (SPEC §3), registered with the Auto classes on import.

Registering costs only the configuration: ``AutoConfig`` gets ``MiniCPMConfig`` (a light module), and
``AutoModel`` / ``AutoModelForCausalLM`` get a stand-in for each model class that imports the modeling
code (``minicpm.py``, which pulls in transformers' modeling stack) the first time transformers asks it for
anything (``from_pretrained``, ``from_config``, ...). ``from paretoq.models.minicpm import
MiniCPMForCausalLM`` gives the real class directly.
"""

from __future__ import annotations

import importlib
import logging

from paretoq.models.minicpm_config import MiniCPMConfig

logger = logging.getLogger(__name__)

MODEL_CLASSES = ("MiniCPMModel", "MiniCPMForCausalLM")


class DeferredModelClass:
    """Stands for ``paretoq.models.minicpm.<name>`` in transformers' Auto mappings until first use: every
    attribute (``from_pretrained``, ``_from_config``, ...) and every call is the real class's."""

    config_class = MiniCPMConfig

    def __init__(self, name: str):
        self.__name__ = self.__qualname__ = name
        self.__module__ = "paretoq.models.minicpm"

    def resolve(self) -> type:
        return getattr(importlib.import_module("paretoq.models.minicpm"), self.__name__)

    def __getattr__(self, attr):
        return getattr(self.resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<deferred class paretoq.models.minicpm.{self.__name__}>"


def register_config() -> None:
    """Register model_type "minicpm" with ``AutoConfig``; idempotent. If transformers itself ever ships a
    "minicpm" model type, its classes are kept."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    if "minicpm" in CONFIG_MAPPING:
        if CONFIG_MAPPING["minicpm"] is not MiniCPMConfig:
            logger.info("transformers already provides model_type 'minicpm'; keeping its classes")
        return
    AutoConfig.register("minicpm", MiniCPMConfig)


def register_model_classes() -> None:
    """Register the (deferred) MiniCPM model classes with ``AutoModel`` / ``AutoModelForCausalLM``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    if "minicpm" in CONFIG_MAPPING and CONFIG_MAPPING["minicpm"] is not MiniCPMConfig:
        return
    for auto, name in ((AutoModel, "MiniCPMModel"), (AutoModelForCausalLM, "MiniCPMForCausalLM")):
        auto.register(MiniCPMConfig, DeferredModelClass(name), exist_ok=True)


def __getattr__(name):
    if name in MODEL_CLASSES:
        return getattr(importlib.import_module("paretoq.models.minicpm"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MiniCPMConfig", "MiniCPMModel", "MiniCPMForCausalLM", "register_config", "register_model_classes"]
