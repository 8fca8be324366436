"""Base model loading: toy | hub id | diffusers folder | single-file checkpoint."""
