"""HiFT vocoders (mel -> 24 kHz waveform): v2 HiFTGenerator, v3 CausalHiFTGenerator."""

from cosyvoice.hift.causal import CausalHiFT, CausalVocoderState, NoiseBuffer
from cosyvoice.hift.hift import HiFT, HiFTConfig, build_hift, load_hift, load_hift_state

__all__ = [
    "CausalHiFT",
    "CausalVocoderState",
    "HiFT",
    "HiFTConfig",
    "NoiseBuffer",
    "build_hift",
    "load_hift",
    "load_hift_state",
]
