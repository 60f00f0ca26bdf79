"""Tooling beside the product path: the benchmark, the seam measurement, training, synthetic
scenes, the demo, segmentation metrics and the memory monitor."""
