"""ReturnFeed media/srt package."""
