"""ReturnFeed tally package."""
