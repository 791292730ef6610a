"""ReturnFeed media package."""
