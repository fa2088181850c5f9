"""HiFT vocoder (mel -> 24 kHz waveform)."""

from cosyvoice.hift.hift import HiFT, HiFTConfig, build_hift, load_hift, load_hift_state

__all__ = ["HiFT", "HiFTConfig", "build_hift", "load_hift", "load_hift_state"]
