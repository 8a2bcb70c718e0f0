"""Recipes (YAML) and architecture files, installed as ``spo_fast.configs``."""
