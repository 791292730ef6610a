"""ReturnFeed live_qc package."""
