"""Held-out evaluation of trained checkpoints: the elastic sub-model grid and the cross-modal scores."""
