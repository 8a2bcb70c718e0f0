"""The reward side: the step-aware preference model (``spm``), its converter from the official checkpoint
(``convert``) and its trainer (``spm_trainer``), the rollout's scorers (``scorers``) and the paper's evaluation
reward models (``metrics``)."""
