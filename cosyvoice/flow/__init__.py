"""CosyVoice2 flow-matching decoder (tokens -> mel)."""

from cosyvoice.flow.flow import FlowConfig, FlowInput, FlowModel, build_flow, fixed_noise, load_flow

__all__ = ["FlowConfig", "FlowInput", "FlowModel", "build_flow", "fixed_noise", "load_flow"]
