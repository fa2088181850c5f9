"""Flow-matching decoders (speech tokens -> mel): CosyVoice2 ``CausalMaskedDiffWithXvec`` (U-Net)
and CosyVoice3 ``CausalMaskedDiffWithDiT`` in :class:`FlowModel`; CosyVoice-300M ``MaskedDiffWithXvec``
in :class:`FlowV1`. :func:`load_flow` picks the right one from the model dir's yaml."""

from cosyvoice.flow.cache import FlowCache
from cosyvoice.flow.flow import FlowConfig, FlowInput, FlowModel, build_flow, fixed_noise, load_flow
from cosyvoice.flow.v1 import FlowV1, FlowV1Config

__all__ = [
    "FlowCache",
    "FlowConfig",
    "FlowInput",
    "FlowModel",
    "FlowV1",
    "FlowV1Config",
    "build_flow",
    "fixed_noise",
    "load_flow",
]
