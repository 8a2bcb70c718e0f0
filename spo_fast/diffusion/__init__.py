"""The diffusion side: loading the pipeline's models, DDIM sampling math, the SPO rollout, graph capture and the
merged-LoRA rollout copy."""
