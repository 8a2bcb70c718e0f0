"""spo_fast: Step-aware Preference Optimization for Stable Diffusion."""
__version__ = "0.1.0"
