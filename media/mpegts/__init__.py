"""ReturnFeed media/mpegts package."""
