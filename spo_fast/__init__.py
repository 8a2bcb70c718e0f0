"""spo_fast: Step-aware Preference Optimization (and the Diffusion-DPO baseline) for Stable Diffusion.

The modules at this level are the commands (``python -m spo_fast.train``, ``.evaluate``, ``.compare``,
``.train_spm``, ``.spm convert``; ``.data cache`` and ``.toyworld build`` are their packages' ``__main__``). The
library is grouped by role: ``core`` (config, the trainer loop, checkpoints, errors, profiling), ``methods`` (one
module per method), ``diffusion`` (models, sampling, rollout, graphs), ``reward`` (the step-aware preference model,
its converter and trainer, scorers, evaluation reward models), ``evaluation``, ``data``, ``toyworld`` and
``kernels`` (Triton kernels beside their PyTorch references). Recipes are package data in ``configs/``.
"""
__version__ = "0.1.0"
