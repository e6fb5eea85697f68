"""The execution engine: every place that runs a model on calibration tokens runs it here, in bounded memory.

- resources: `--device` and `--max-memory` resolved to a Runtime (default budget from the free memory);
- weights: where weights come from (a checkpoint read in place, or a rewrite computed on the fly);
- lazy_model: the model on the meta device, its weights brought in per module by accelerate's hooks;
- buffers: reused float32 buffers that streamed weights are widened into;
- loading: opening a folder (remote-code gate, tokenizer, lazy or whole model);
- forward: batched forwards that keep chosen block outputs.
"""
