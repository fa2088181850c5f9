"""rtserver: a real-time CosyVoice text-to-speech server (HTTP + WebSocket, one scheduler)."""

__version__ = "0.1.0"
