"""Step-aware preference model tools: ``python -m spo_fast.spm convert --official FILE --clip DIR --out DIR``.

The command: its arguments. The conversion itself (key map, gate offset, checks) is
:mod:`spo_fast.reward.convert`; the model is :mod:`spo_fast.reward.spm`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from spo_fast.core.errors import ArgumentParser, InputError, report
from spo_fast.reward.convert import convert


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m spo_fast.spm",
                            description="Step-aware preference model tools.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    conv = sub.add_parser(
        "convert", help="convert the official SPO step-aware preference model checkpoint to an SPM directory",
        description="Convert the official SPO step-aware preference model checkpoint (.bin or .safetensors) into "
                    "an spo_fast SPM directory (scorer.path=OUT).",
        epilog="Example: python -m spo_fast.spm convert --official sd-v1-5_step-aware_preference_model.bin "
               "--clip /models/CLIP-ViT-H-14-laion2B-s32B-b79K --out /models/spo_spm_sd15")
    conv.add_argument("--official", required=True, type=Path,
                      help="the official checkpoint: sd-v1-5_step-aware_preference_model.bin or "
                           "sdxl_step-aware_preference_model.bin (or a .safetensors export of it)")
    conv.add_argument("--clip", required=True, type=Path,
                      help="directory of the CLIP the SPM was trained from (laion CLIP-ViT-H-14-laion2B-s32B-b79K or "
                           "PickScore_v1): its config.json (and tokenizer); every weight comes from --official")
    conv.add_argument("--tokenizer", type=Path,
                      help="directory with the CLIPTokenizer files (default: --clip; PickScore_v1 has none: use "
                           "the laion CLIP-ViT-H-14 directory)")
    conv.add_argument("--out", required=True, type=Path, help="new SPM directory to write (must not exist or be "
                                                              "empty)")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.official, args.clip, args.out, args.tokenizer)
    except InputError as e:
        return report(e)
    print(summary)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
