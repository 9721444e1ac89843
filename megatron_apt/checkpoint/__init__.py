"""Checkpoint formats and conversions."""
