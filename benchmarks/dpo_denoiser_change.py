"""Does a Diffusion-DPO LoRA damage the denoiser? Implicit accuracy and the change of the denoising MSE on the winners
and the losers of preference pairs, train vs held-out (docs/toy_world.md, why Diffusion-DPO fell below its base).

    python benchmarks/dpo_denoiser_change.py --lora outputs/toy_dpo/lora [--model toyworld:base] [--pairs-dir DIR]

For up to ``--pairs`` pairs without ties of ``pairs_train.parquet`` and ``pairs_heldout.parquet`` (the toy world's
shipped ones by default), ``--draws`` draws of (t ~ U[0, 1000), noise) per pair: the MSE of the LoRA's prediction
against its target (noise, or v for a v-prediction model) minus the frozen base's on the same noisy input, for the
winner and the loser; the implicit accuracy is the share of draws where the winner's change is below the loser's.
Prints JSON.
"""
from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq
import torch

from spo_fast.diffusion.models import encode_prompts, load_components, resolve_model_path, toyworld_assets
from spo_fast.toyworld.build import decode_jpeg


@torch.no_grad()
def denoiser_change(comp, pairs_file, n_pairs: int, draws: int, seed: int = 0) -> dict:
    table = pq.read_table(pairs_file).to_pydict()
    keep = [i for i, lab in enumerate(table["label_0"]) if lab != 0.5][:n_pairs]
    first_wins = [table["label_0"][i] == 1 for i in keep]
    side = lambda i, w, first: table["jpg_0" if first == w else "jpg_1"][i]
    win = torch.stack([decode_jpeg(side(i, True, f)) for i, f in zip(keep, first_wins)])
    lose = torch.stack([decode_jpeg(side(i, False, f)) for i, f in zip(keep, first_wins)])
    cond = encode_prompts(comp, [table["caption"][i] for i in keep], "cpu", win.shape[-1]).embeds
    alphas = comp.scheduler.alphas_cumprod.float()
    v_pred = comp.scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(seed)
    acc = d_win = d_lose = 0.0
    for _ in range(draws):
        t = torch.randint(0, len(alphas), (len(keep),), generator=gen)
        noise = torch.randn(win.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        change = {}
        for name, x0 in (("win", win), ("lose", lose)):
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
            comp.unet.enable_adapters()
            pol = comp.unet(x_t, t, encoder_hidden_states=cond).sample
            comp.unet.disable_adapters()
            ref = comp.unet(x_t, t, encoder_hidden_states=cond).sample
            change[name] = ((pol - target) ** 2).mean((1, 2, 3)) - ((ref - target) ** 2).mean((1, 2, 3))
        acc += (change["win"] < change["lose"]).float().sum().item()
        d_win += change["win"].sum().item()
        d_lose += change["lose"].sum().item()
    n = len(keep) * draws
    return {"pairs": len(keep), "draws": draws, "implicit_accuracy": acc / n, "mse_change_winners": d_win / n,
            "mse_change_losers": d_lose / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", required=True, help="a LoRA directory written by spo_fast.train (method dpo)")
    p.add_argument("--model", default="toyworld:base")
    p.add_argument("--pairs-dir", default=None, help="holds pairs_train.parquet and pairs_heldout.parquet "
                                                     "(default: the toy world's assets)")
    p.add_argument("--pairs", type=int, default=192, help="pairs without ties per file (default 192)")
    p.add_argument("--draws", type=int, default=4, help="(t, noise) draws per pair (default 4)")
    args = p.parse_args(argv)
    comp = load_components(str(resolve_model_path(args.model)), "sd15")
    comp.unet.load_lora_adapter(args.lora, weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                                adapter_name="dpo")
    pairs_dir = args.pairs_dir or toyworld_assets()
    out = {split: denoiser_change(comp, f"{pairs_dir}/pairs_{split}.parquet", args.pairs, args.draws)
           for split in ("train", "heldout")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
