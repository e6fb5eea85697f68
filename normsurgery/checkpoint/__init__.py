"""Checkpoint I/O: lazy, checked reading of model folders and atomic, sharded writing."""
