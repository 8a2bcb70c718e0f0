"""``python -m spo_fast.data cache``: build the latent cache of a preference-pairs dataset ahead of training.

Example (toy world): python -m spo_fast.data cache --pairs spo_fast/toyworld/assets/pairs_train.parquet
--model toyworld:base --cache-dir outputs/cache
"""
from __future__ import annotations

import argparse
import sys

import torch

from .cache import LatentCache, cache_key, encoders_for
from .pairs import BAD_ROWS, TIES, PairDataset


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build the cache, print a one-line summary. Bad input: ``error: ...`` on stderr, returns 2."""
    parser = argparse.ArgumentParser(prog="python -m spo_fast.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("cache", help="encode every pair's images and caption into a latent cache",
                         epilog=" ".join(__doc__.splitlines()[2:]))
    cmd.add_argument("--pairs", required=True, help="a parquet file, a directory of shards or a glob (Pick-a-Pic schema), or toyworld:train")
    cmd.add_argument("--model", required=True, help="diffusers model directory (or toyworld:base)")
    cmd.add_argument("--family", default="sd15", choices=("sd15", "sdxl"))
    cmd.add_argument("--resolution", type=_positive, help="image side in pixels (default: the model's native size)")
    cmd.add_argument("--cache-dir", required=True, help="output directory (created; an existing cache is completed)")
    cmd.add_argument("--ties", default="drop", choices=TIES)
    cmd.add_argument("--bad-rows", default="error", choices=BAD_ROWS)
    cmd.add_argument("--batch-size", type=_positive, default=16, help="pairs per encoder call (default 16)")
    args = parser.parse_args(argv)
    from ..models import load_components  # diffusers: imported after argument parsing

    try:
        dataset = PairDataset(args.pairs, args.ties, args.bad_rows)
        comp = load_components(args.model, args.family)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for m in (*comp.text_encoders, *([comp.vae] if comp.vae is not None else [])):
            m.to(device)
        res = args.resolution or comp.latent_shape[1] * comp.vae_scale_factor
        model_id, encode_images, encode_text = encoders_for(comp, args.model, res, device)
        cache = LatentCache.open(args.cache_dir, cache_key(model_id, res, dataset), dataset, encode_images,
                                 encode_text, batch_size=args.batch_size)
    except (ValueError, OSError) as e:  # PairsError, CacheError and ModelDirError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cached {len(dataset) - cache.skipped} pairs ({cache.skipped} skipped as bad images) of "
          f"{len(dataset.shards)} shard(s) at {res} px in {cache.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
