"""Training data: prompt sets (``prompts``), preference pairs (``pairs``) and their latent cache (``cache``)."""
from spo_fast.data.cache import CachedBatch, CacheError, LatentCache, cache_key, encoders_for
from spo_fast.data.pairs import (
    PAIR_COLUMNS,
    PairBatch,
    PairDataset,
    Pairs,
    PairsError,
    decode_image,
    load_all,
    resolve_shards,
)
from spo_fast.data.prompts import PromptSampler, builtin_toy_prompts, load_prompts

__all__ = [
    "PAIR_COLUMNS", "CacheError", "CachedBatch", "LatentCache", "PairBatch", "PairDataset", "Pairs", "PairsError",
    "PromptSampler", "builtin_toy_prompts", "cache_key", "decode_image", "encoders_for", "load_all", "load_prompts",
    "resolve_shards",
]
