"""Export: the config and modeling code that make a rewritten checkpoint load with transformers."""
