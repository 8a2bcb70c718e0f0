"""``python -m spo_fast.data cache``: build the latent cache of a preference-pairs dataset ahead of training.

Example (toy world): python -m spo_fast.data cache --pairs toyworld:train
--model toyworld:base --cache-dir outputs/cache
"""
from __future__ import annotations

import sys

import torch

from spo_fast.core.errors import ArgumentParser, InputError, number_arg, report
from spo_fast.data.cache import LatentCache, cache_key, check_cache_dir, encoders_for
from spo_fast.data.pairs import BAD_ROWS, TIES, PairDataset


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build the cache, print a one-line summary. Bad input: ``error: ...`` on stderr, returns 2.

    Everything that can be checked without building a model is checked first: the pairs files (schema, labels,
    the first rows' images), the model directory (layout, configs, weights-file headers), ``--resolution``
    against the model's VAE factor and the cache directory (writable, or an existing cache's manifest)."""
    parser = ArgumentParser(prog="python -m spo_fast.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("cache", help="encode every pair's images and caption into a latent cache",
                         epilog=" ".join(__doc__.splitlines()[2:]))
    cmd.add_argument("--pairs", required=True, help="a parquet file, a directory of shards or a glob (Pick-a-Pic schema), or toyworld:train")
    cmd.add_argument("--model", required=True, help="diffusers model directory (or toyworld:base)")
    cmd.add_argument("--family", default="sd15", choices=("sd15", "sdxl"))
    cmd.add_argument("--resolution", type=number_arg(int, 1), help="image side in pixels (default: the model's native size)")
    cmd.add_argument("--cache-dir", required=True, help="output directory (created; an existing cache is completed)")
    cmd.add_argument("--ties", default="drop", choices=TIES)
    cmd.add_argument("--bad-rows", default="error", choices=BAD_ROWS)
    cmd.add_argument("--batch-size", type=number_arg(int, 1), default=16, help="pairs per encoder call (default 16)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from spo_fast.diffusion.models import (  # diffusers
        check_model_dir,
        load_components,
        native_resolution,
        resolve_model_path,
    )

    try:
        dataset = PairDataset(args.pairs, args.ties, args.bad_rows, option="--pairs")
        dataset.check_first()  # a file of unreadable images fails now; the build checks every row
        root = resolve_model_path(args.model)
        check_model_dir(root, args.family, "pretrained")
        if args.resolution is not None:
            try:
                native, factor = native_resolution(root)
            except (KeyError, TypeError, ValueError):  # no sample_size: encoders_for checks it after loading
                native, factor = None, 1
            if args.resolution % factor:
                raise InputError(f"--resolution {args.resolution} is not a multiple of {factor}, the VAE's scale "
                                 f"factor of {root}; give a multiple of {factor} (its native size is {native})")
        check_cache_dir(args.cache_dir, "--cache-dir")
        comp = load_components(args.model, args.family)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for m in (*comp.text_encoders, *([comp.vae] if comp.vae is not None else [])):
            m.to(device)
        res = args.resolution or comp.latent_shape[1] * comp.vae_scale_factor
        model_id, encode_images, encode_text = encoders_for(comp, args.model, res, device)
        cache = LatentCache.open(args.cache_dir, cache_key(model_id, res, dataset), dataset, encode_images,
                                 encode_text, batch_size=args.batch_size, progress=not args.no_progress)
    except InputError as e:  # PairsError, CacheError, ModelDirError, WeightsFileError
        return report(e)
    print(f"cached {len(dataset) - cache.skipped} pairs ({cache.skipped} skipped as bad images) of "
          f"{len(dataset.shards)} shard(s) at {res} px in {cache.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
