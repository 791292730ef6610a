"""WebRTC sessions built on aiortc transports with our own media paths."""
