"""Federated LoRA methods: one file each, one registry, one contract (:mod:`.base`)."""

from fedlora.methods import (  # noqa: F401  (importing registers each method)
    fedex_lora,
    fedit,
    fedmomentum,
    fedrot_lora,
    fedsa_lora,
    fedsmooth_lora,
    ffa_lora,
    flexlora,
    flora,
    frlora,
    rolora,
)
from fedlora.methods.base import (
    ClientContext,
    ClientStart,
    ClientUpload,
    Factors,
    GlobalState,
    LoRASpec,
    Method,
    ModuleFactors,
    RoundResult,
)
from fedlora.methods.registry import (
    SettingsError,
    available_methods,
    build_method,
    describe_methods,
    method_class,
)

__all__ = [
    "ClientContext",
    "ClientStart",
    "ClientUpload",
    "Factors",
    "GlobalState",
    "LoRASpec",
    "Method",
    "ModuleFactors",
    "RoundResult",
    "SettingsError",
    "available_methods",
    "build_method",
    "describe_methods",
    "method_class",
]
