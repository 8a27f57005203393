"""Calibration and held-out text: built-in, files, datasets, and text the dense model writes
itself."""
