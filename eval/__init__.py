"""Sampling, grids and quality metrics for trained pipelines."""
