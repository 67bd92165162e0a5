"""Calibration of the early-exit classifier (features per layer, labels, training, threshold)."""
