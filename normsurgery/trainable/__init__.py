"""Trainable rewrites: norms swapped in a loaded model for stand-ins that training can change (frozen scale,
DyT, Derf), calibrated on text and healed with the fine-tune engine, then exported."""
