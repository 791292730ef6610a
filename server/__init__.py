"""ReturnFeed server package."""
