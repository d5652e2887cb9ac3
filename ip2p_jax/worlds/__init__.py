"""Synthetic edit worlds with exact ground truth (the shapes world is the embedded dataset)."""
