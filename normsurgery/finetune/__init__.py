"""The shared short fine-tune engine (LN removal, DyT/Derf healing, pruning heal), built on accelerate."""
