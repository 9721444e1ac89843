"""Inference: sampling, grids and videos."""
