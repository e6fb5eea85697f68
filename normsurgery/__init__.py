"""normsurgery: post-training surgery on the normalization layers and depth of transformer LMs."""

__version__ = "0.1.0"
