"""ReturnFeed media/rtp package."""
