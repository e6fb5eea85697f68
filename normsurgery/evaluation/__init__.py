"""`normsurgery eval`: lm-eval on a model folder, offline tasks over the held-out Shakespeare text, comparisons."""
