"""The SPO training forward/backward in fp16 two ways, on identical inputs, against a float64 reference:

- ``ours``: what the trainer does under ``train.mixed_precision=fp16`` with LoRA: the UNet's base weights in fp16,
  the LoRA weights in fp32, the forward under fp16 autocast (so LoRA matmuls run in fp16 and autocast keeps
  normalisations in fp32), latents x_t in fp32 (the rollout's buffers), the DDIM statistics and the loss in fp32;
- ``official``: the official SPO trainer's LoRA path: the same fp16 base and fp32 LoRA weights, **no** autocast
  (peft runs the LoRA branch in fp32 and casts its output back to fp16; everything else, GroupNorm included, in
  fp16), fp16 latents and embeddings, classifier-free guidance combined in fp16, the DDIM statistics in fp32 (its
  schedule tensors are fp32).

Both see the same fp16-representable x_t, x_{t-1}, t and text embeddings; the LoRA's B matrices are random (small) so
that policy and reference differ as they do after some training. Reported per path: the loss, the per-pair log-ratio
error and the LoRA gradient's relative error and cosine against float64 (the same model and inputs in float64).

    python benchmarks/train_precision.py                        # tiny SD1.5 architecture, 8 pairs; seconds
    python benchmarks/train_precision.py --arch arch:sd15 --res 256 --pairs 2 --reference fp32   # minutes

CPU fp16 kernels are not a GPU's (oneDNN accumulates in fp32 and rounds each op's output to fp16; cuBLAS/cuDNN may
also reduce in fp16), so on a GPU both paths' errors differ in detail; the comparison is of the two regimes.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="arch:tiny_sd15")
    ap.add_argument("--res", type=int, default=0, help="image resolution (0: the architecture's)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lora-b-std", type=float, default=0.0, help="0: chosen so the log-ratios are ~1e-2")
    ap.add_argument("--reference", default="fp64", choices=("fp64", "fp32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    from peft import LoraConfig

    from spo_fast.diffusion.models import encode_negative, encode_prompts, load_components
    from spo_fast.diffusion.sampling import DDIMSchedule, ddim_step_stats, guide
    from spo_fast.kernels.spo_loss import spo_loss
    from spo_fast.toyworld import world

    torch.manual_seed(args.seed)
    comp = load_components(args.arch, "sd15", "random", args.seed)
    C, H, W = comp.latent_shape
    if args.res:
        H = W = args.res // comp.vae_scale_factor
    n, g_scale, eta = args.pairs, 5.0, 1.0
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, 20)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = world.prompts("train")[:n]
    cond = encode_prompts(comp, prompts, "cpu", H * comp.vae_scale_factor).embeds.half()
    uncond = encode_negative(comp, "", n, "cpu", H * comp.vae_scale_factor).embeds.half()
    t = schedule.timesteps[4 + torch.randint(0, 16, (n,), generator=gen)]

    base = comp.unet.eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet = copy.deepcopy(base).half()
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=targets))
    for name, p in unet.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    lora = {name: p for name, p in unet.named_parameters() if p.requires_grad}

    def set_b(std):
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for name, p in lora.items():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    ref_dtype = torch.float64 if args.reference == "fp64" else torch.float32
    x_t = (torch.randn(n, C, H, W, generator=gen) * 0.8).half()  # fp16-representable inputs shared by all paths

    def forward(model, x, tt, c, u, regime):
        """Guided noise prediction of ``model`` in a regime: 'ref' (float64/32 everything), 'ours', 'official'."""
        if regime == "ref":
            out = model(torch.cat([x, x]).to(ref_dtype), torch.cat([tt, tt]),
                        encoder_hidden_states=torch.cat([u, c]).to(ref_dtype)).sample
            return guide(out, g_scale)
        if regime == "ours":
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(torch.cat([x, x]).float(), torch.cat([tt, tt]),
                            encoder_hidden_states=torch.cat([u, c])).sample
                return guide(out, g_scale)
        out = model(torch.cat([x, x]).half(), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([u, c])).sample
        ou, oc = out.chunk(2)
        return ou + g_scale * (oc - ou)  # fp16 arithmetic, as the official training step

    def build_ref_model():
        m = copy.deepcopy(unet).to(ref_dtype)
        return m, {name: p for name, p in m.named_parameters() if p.requires_grad}

    # x_{t-1} of win and lose: samples of the reference model's step (float64), rounded to fp16
    def make_prev():
        m, _ = build_ref_model()
        with torch.no_grad():
            m.disable_adapters()
            _, mu, std = ddim_step_stats(schedule, forward(m, x_t, t, cond, uncond, "ref"), x_t.to(ref_dtype), t, eta)
        noise = torch.randn(2, n, C, H, W, generator=gen, dtype=torch.float64)
        return (mu.double()[None] + std.double().view(1, n, 1, 1, 1) * noise).half()

    x_prev = make_prev()
    std_b = args.lora_b_std
    if not std_b:  # pick the B scale so the policy's log-ratios are ~1e-2 (inside the clamp, as in training)
        std_b = 1e-3
        for _ in range(12):
            set_b(std_b)
            m, _ = build_ref_model()
            with torch.no_grad():
                _, mu_p, std = ddim_step_stats(schedule, forward(m, x_t, t, cond, uncond, "ref"), x_t.to(ref_dtype),
                                               t, eta)
                m.disable_adapters()
                _, mu_r, _ = ddim_step_stats(schedule, forward(m, x_t, t, cond, uncond, "ref"), x_t.to(ref_dtype),
                                             t, eta)
            s2 = 2 * std.double().view(n, 1, 1, 1) ** 2
            lr = (((x_prev[0].double() - mu_r.double()) ** 2 - (x_prev[0].double() - mu_p.double()) ** 2) / s2)
            mag = lr.flatten(1).mean(1).abs().median().item()
            if 3e-3 <= mag <= 3e-2:
                break
            std_b *= (1e-2 / max(mag, 1e-12)) ** 0.5
    set_b(std_b)

    valid = torch.ones(n)

    def run(regime):
        if regime == "ref":
            m, params = build_ref_model()
        else:
            m, params = unet, lora
        for p in params.values():
            p.grad = None
        x = x_t.to(ref_dtype) if regime == "ref" else x_t.float()
        with torch.no_grad():
            m.disable_adapters()
            _, mu_r, _ = ddim_step_stats(schedule, forward(m, x_t, t, cond, uncond, regime), x, t, eta)
            m.enable_adapters()
        _, mu_p, std = ddim_step_stats(schedule, forward(m, x_t, t, cond, uncond, regime), x, t, eta)
        if regime == "ref":
            mu_p, mu_r, std = mu_p.to(ref_dtype), mu_r.to(ref_dtype), std.to(ref_dtype)
            xw, xl = x_prev[0].to(ref_dtype), x_prev[1].to(ref_dtype)
            s2 = 2 * std.view(n, 1, 1, 1) ** 2
            lr_w = (((xw - mu_r) ** 2 - (xw - mu_p) ** 2) / s2).flatten(1).mean(1)
            lr_l = (((xl - mu_r) ** 2 - (xl - mu_p) ** 2) / s2).flatten(1).mean(1)
            lo, hi = (torch.log1p(torch.tensor(v, dtype=ref_dtype)) for v in (-0.1, 0.1))
            ratio_w, ratio_l = lr_w.clamp(lo, hi), lr_l.clamp(lo, hi)
            loss = torch.nn.functional.softplus(-10.0 * (ratio_w - ratio_l)).mean()
            lrs = torch.stack([lr_w, lr_l])
        else:
            out = spo_loss(mu_p, mu_r, x_prev[0].float(), x_prev[1].float(), std, valid, 10.0, 0.1, backend="torch")
            loss = out.loss
            s2 = 2 * std.double().view(n, 1, 1, 1) ** 2
            lrs = torch.stack([(((xs.double() - mu_r.double()) ** 2 - (xs.double() - mu_p.double()) ** 2) / s2)
                               .flatten(1).mean(1) for xs in (x_prev[0], x_prev[1])])
        loss.backward()
        grad = torch.cat([params[k].grad.double().flatten() for k in sorted(params)])
        return loss.item(), lrs.double().detach(), grad

    ref_loss, ref_lr, ref_grad = run("ref")
    res = {"arch": args.arch, "latent": [C, H, W], "pairs": n, "lora_rank": args.rank, "lora_b_std": std_b,
           "reference": args.reference, "torch": torch.__version__, "device": "cpu", "loss_reference": ref_loss,
           "log_ratio_reference_median_abs": ref_lr.abs().median().item()}
    for regime in ("ours", "official"):
        loss, lrs, grad = run(regime)
        res[regime] = {
            "loss": loss, "loss_abs_err": abs(loss - ref_loss),
            "log_ratio_abs_err_max": (lrs - ref_lr).abs().max().item(),
            "log_ratio_abs_err_mean": (lrs - ref_lr).abs().mean().item(),
            "grad_rel_err": ((grad - ref_grad).norm() / ref_grad.norm()).item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item(),
        }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
