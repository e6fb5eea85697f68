"""Depth pruning: per-block statistics, block selection, skipping blocks in a loaded model."""
