"""Does a toy base model follow its prompts, and where does the text act? (docs/toy_world.md, why the shipped base
ignores its prompts)

    python benchmarks/toy_base_diagnosis.py [--model toyworld:base] [--cfg 1,3,5,9] [--sampler 20,1;50,1;20,0] \\
        [--parts samples,text_effect_mse,attribute_swap,text_attention,layout,quality_spread] \\
        [--ts 100,400,700,900] [--seeds 4]

On the 64 probe prompts (``world.probe_prompts``), one sample each (noise seed 300, the build's probe): the mean
ground truth, each component, the objectness and the share of empty frames (object contrast < 0.1) for each CFG
scale (20 DDIM steps, eta 1) and each ``steps,eta`` sampler (CFG 5); then the model's denoising MSE on renders of
the same prompts at t = 100, 400, 700, 900 with the right prompt, the empty prompt and another prompt (the list
rotated by one): where the three agree, the text does not change the prediction; and, on the same noised renders
with the right prompt, where the cross-attention looks: the share of its attention (mean over heads and pixels) on
the start token, on each attribute's word(s), on the other words, and on the end token with its padding, how
spread it is (entropy), how much it differs between pixels (total variation), how much of that depends on the
pixel's place alone (and that statistic's chance level, with each sample's pixels shuffled), and whether the position
words' attention peaks at the places they name, per layer and t; and, along the sampler's own trajectories (20
DDIM steps, eta 1, CFG 5), where each step's estimate of the clean image puts the object: how far toward the place
its prompt names (``position_lean``); and how much the outcome varies between samples of one prompt
(``quality_spread``: each component's mean, its standard deviation over all samples and within a prompt, over
``--seeds`` noise seeds per prompt, for the data's renders with their drawn quality and for the model at each CFG
scale and each sampler): what a method that selects among samples (SPO's pools, the pairs) has to choose from.
Prints JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from spo_fast.diffusion.models import encode_prompts, load_components, resolve_model_path
from spo_fast.toyworld import build, world


def sample_stats(comp, prompts, num_steps: int, eta: float, guidance: float) -> dict:
    attrs = [world.parse_prompt(p) for p in prompts]
    images = build.sample_images(comp, prompts, 300, batch=len(prompts), num_steps=num_steps, eta=eta,
                                 guidance_scale=guidance)
    m = world.measure(images)
    out = {"steps": num_steps, "eta": eta, "cfg": guidance, "score": world.score(images, attrs).mean().item(),
           "objectness": m["objectness"].mean().item(), "empty": (m["contrast"] < 0.1).float().mean().item()}
    out.update({k: v.mean().item() for k, v in world.score_components(images, attrs).items()})
    return out


@torch.no_grad()
def text_effect(comp, prompts, ts=(100, 400, 700, 900), conds: dict | None = None) -> list[dict]:
    """The model's denoising MSE (of its own target: epsilon or v) on renders of ``prompts`` noised to each t, with
    each of ``conds`` (name -> prompts); by default the right prompts, the empty prompt and other prompts (the list
    rotated by one)."""
    x0 = world.render([world.parse_prompt(p) for p in prompts], torch.Generator().manual_seed(0))
    conds = conds or {"right": prompts, "empty": [""] * len(prompts), "other": prompts[1:] + prompts[:1]}
    embeds = {k: encode_prompts(comp, v, "cpu", x0.shape[-1]).embeds for k, v in conds.items()}
    alphas = comp.scheduler.alphas_cumprod.float()
    v_pred = comp.scheduler.config.prediction_type == "v_prediction"
    rows = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        a = alphas[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
        tt = torch.full((len(prompts),), t)
        rows.append({"t": t, **{k: ((comp.unet(x_t, tt, encoder_hidden_states=e).sample - target) ** 2).mean().item()
                                 for k, e in embeds.items()}})
    return rows


ATTRIBUTES = {"color": world.COLORS, "shape": world.SHAPES, "size": world.SIZES, "position": world.POSITIONS,
              "background": world.BACKGROUNDS}


def swapped(prompts: list[str], field: str) -> list[str]:
    """``prompts`` with one attribute changed to the next word of its vocabulary (cyclically), the rest kept."""
    vocab = ATTRIBUTES[field]
    out = []
    for p in prompts:
        a = world.parse_prompt(p)
        out.append(dataclasses.replace(a, **{field: vocab[(vocab.index(getattr(a, field)) + 1) % len(vocab)]}).prompt)
    return out


@torch.no_grad()
def attribute_swap(comp, prompts, ts=(100, 400, 700, 900)) -> dict:
    """Does each attribute's word reach the UNet? For each attribute, the prompts with that word swapped
    (``swapped``): how far the text encoder's output moves (mean over prompts of the largest per-token L2 change,
    and the change at the end token, relative to the mean norm of the hidden states), and the model's denoising MSE
    at each t with the swapped prompts next to the right ones (``text_effect``): where the two are equal, the model
    ignores that word."""
    size = world.RESOLUTION
    right = encode_prompts(comp, prompts, "cpu", size).embeds
    eos = comp.tokenizers[0].eos_token_id
    ids = comp.tokenizers[0](prompts, add_special_tokens=True).input_ids
    end = torch.tensor([row.index(eos) for row in ids])  # the first end token of each prompt
    scale = right.norm(dim=-1).mean()
    encoder = {}
    for field in ATTRIBUTES:
        diff = (encode_prompts(comp, swapped(prompts, field), "cpu", size).embeds - right).norm(dim=-1)  # (B, L)
        encoder[field] = {"max_token": (diff.amax(1).mean() / scale).item(),
                          "end_token": (diff[torch.arange(len(prompts)), end].mean() / scale).item()}
    conds = {"right": prompts, **{field: swapped(prompts, field) for field in ATTRIBUTES}}
    return {"text_encoder_change": encoder, "denoising_mse": text_effect(comp, prompts, ts, conds)}


def position_lean(centroids: torch.Tensor, attrs: list, size: int) -> torch.Tensor:
    """(N,) how far each measured centroid (N, 2) (x, y) px has moved from the image centre toward its prompt's
    place: the projection of (centroid - centre) on (anchor - centre), over |anchor - centre|^2; 1 at the named
    place, 0 anywhere on the line through the centre across that direction, negative on the other side. NaN for
    ``center`` prompts (no direction)."""
    centre = size / 2  # pixel i spans [i, i + 1) in the units of world.anchor and world.measure
    d = world.anchor(attrs, size) - centre
    norm2 = (d * d).sum(1)
    lean = ((centroids - centre) * d).sum(1) / norm2.clamp(min=1e-6)
    return torch.where(norm2 > 1e-6, lean, torch.full_like(lean, float("nan")))


@torch.no_grad()
def layout(comp, prompts, num_steps: int = 20, eta: float = 1.0, guidance: float = 5.0,
           record=(0, 2, 4, 6, 8, 12, 19)) -> list[dict]:
    """Where the sampler's estimate of the clean image puts the object, step by step: DDIM from seed-300 noise
    (torch.randn step noise, fp32), and at each recorded step index i (t) the x0 estimate's measured centroid
    (``world.measure``): its mean ``position_lean`` over the prompts that name a side (and its standard error),
    its mean distance to the named anchor (px), its mean contrast (object against background; below 0.1 the frame
    is empty and its centroid meaningless), and the mean centroid per position word; the last row is the final
    sample."""
    from spo_fast.diffusion.models import Conditioning
    from spo_fast.diffusion.sampling import DDIMSchedule, cfg_model_output, ddim_step_stats

    attrs = [world.parse_prompt(p) for p in prompts]
    size = world.RESOLUTION
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, num_steps)
    cond: Conditioning = encode_prompts(comp, prompts, "cpu", size)
    uncond = encode_prompts(comp, [""] * len(prompts), "cpu", size)
    gen = torch.Generator().manual_seed(300)
    x = torch.randn((len(prompts), *comp.latent_shape), generator=gen)

    def row(step, t, image: torch.Tensor) -> dict:
        m = world.measure(image.clamp(-1, 1))
        lean = position_lean(m["centroid"], attrs, size)
        by_word = {}
        for a, c in zip(attrs, m["centroid"]):
            by_word.setdefault(a.position, []).append(c)
        sided = lean[~lean.isnan()]
        return {"step": step, "t": t, "lean": sided.mean().item(), "lean_se": (sided.std() / len(sided) ** 0.5).item(),
                "anchor_distance": (m["centroid"] - world.anchor(attrs, size)).norm(dim=1).mean().item(),
                "contrast": m["contrast"].mean().item(),
                "centroid_by_word": {w: torch.stack(v).mean(0).tolist() for w, v in sorted(by_word.items())}}

    rows = []
    for i, t_scalar in enumerate(schedule.timesteps):
        t = t_scalar.expand(x.shape[0])
        x0, mean, std = ddim_step_stats(schedule, cfg_model_output(comp.unet, x, t, cond, uncond, guidance), x, t, eta)
        if i in record:
            rows.append(row(i, int(t_scalar), x0))
        x = mean + std.view(-1, 1, 1, 1) * torch.randn(mean.shape, generator=gen)
    rows.append(row("final", 0, x))
    return rows


def spread(images: torch.Tensor, attrs: list, seeds: int) -> dict:
    """Per component (and the score): mean, sd over all images, and the mean over prompts of the sd over their
    ``seeds`` images; images are seed-major ((seeds * P), ...). ``present``: the picture-quality components again
    over the images whose object is there (objectness > 0.5; the within-prompt sd over the prompts with two such
    images or more), since every object term is 0 in an empty frame."""
    comps = world.score_components(images, attrs)
    comps["score"] = world.score(images, attrs)
    out = {}
    for k, v in comps.items():
        v = v.double().view(seeds, -1)
        out[k] = {"mean": round(v.mean().item(), 4), "sd": round(v.std().item(), 4),
                  "sd_within_prompt": round(v.std(dim=0).mean().item(), 4)}
    there = world.measure(images)["objectness"].view(seeds, -1) > 0.5
    many = there.sum(0) >= 2
    present = {"share": round(there.double().mean().item(), 4), "prompts": int(many.sum())}
    for k in world.QUALITY_FIELDS:
        v = comps[k].double().view(seeds, -1)
        within = [v[there[:, j], j].std().item() for j in range(v.shape[1]) if many[j]]
        present[k] = {"mean": round(v[there].mean().item(), 4) if there.any() else None,
                      "sd_within_prompt": round(sum(within) / len(within), 4) if within else None}
    out["present"] = present
    return out


def quality_spread(comp, prompts, samplers, seeds: int) -> dict:
    attrs = [world.parse_prompt(p) for p in prompts] * seeds
    g = torch.Generator().manual_seed(0)
    data = world.render(attrs, g, world.sample_quality(len(attrs), g))
    out = {"seeds": seeds, "data": spread(data, attrs, seeds), "model": []}
    for num_steps, eta, guidance in samplers:
        images = torch.cat([build.sample_images(comp, prompts, 300 + s, batch=len(prompts), num_steps=num_steps,
                                                eta=eta, guidance_scale=guidance) for s in range(seeds)])
        out["model"].append({"steps": num_steps, "eta": eta, "cfg": guidance, **spread(images, attrs, seeds)})
    return out


PARTS = ("samples", "text_effect_mse", "attribute_swap", "text_attention", "layout", "quality_spread")
TOKEN_GROUPS = ("start", "size", "color", "shape", "position", "background", "other_words", "end_and_padding")


def token_groups(tokenizer, prompt: str) -> list[str]:
    """The group of every token position of ``prompt`` as ``encode_prompts`` tokenizes it (padded to the maximum
    length): the prompt template's pieces, each tokenized alone, in order."""
    a = world.parse_prompt(prompt)
    pieces = [("other_words", "a"), ("size", a.size), ("color", a.color), ("shape", a.shape),
              ("position", world.POSITION_PHRASES[a.position]), ("other_words", ","), ("background", a.background),
              ("other_words", "background")]
    groups = ["start"]
    for group, text in pieces:
        groups += [group] * len(tokenizer(text, add_special_tokens=False).input_ids)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    if len(groups) >= len(ids) or ids[len(groups)] != tokenizer.eos_token_id:
        raise ValueError(f"{prompt!r}: its tokens do not follow the prompt template's pieces")
    return groups + ["end_and_padding"] * (len(ids) - len(groups))


class _AttentionRecorder:
    """Wraps a cross-attention's processor and stores, in this order:

    - the attention probabilities' mean over heads and queries, (B, L);
    - their entropy over the L tokens in units of log L (1 = uniform over the tokens), mean over heads and queries,
      (B,);
    - how far each pixel's distribution is from the image's mean distribution (total variation; 0 = every pixel reads
      the same blend of the tokens, as it would have to if the text could not say where), mean over heads and
      queries, (B,);
    - the same distance for the batch's mean attention at each pixel: the part of that variation that depends on the
      pixel's place alone, the same for every prompt and noise (0 when a query cannot tell where it is), (B,) copies
      of one value;
    - that statistic again with each sample's pixels shuffled (a fixed permutation per sample): its chance level for
      this batch size, (B,) copies of one value;
    - the attention's mean over heads at every pixel, (B, pixels, L).

    Then it lets the wrapped processor compute the output."""

    def __init__(self, inner, store: dict, name: str):
        self.inner, self.store, self.name = inner, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (B * heads, pixels, L)
        probs = probs.view(b, attn.heads, *probs.shape[1:])
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])
        spatial = 0.5 * (probs - probs.mean(dim=2, keepdim=True)).abs().sum(-1)  # (B, heads, pixels)
        pattern = probs.mean(dim=0)  # (heads, pixels, L): what a pixel reads whatever the prompt and noise
        n = probs.shape[2]
        perm = torch.argsort(torch.rand(b, n, generator=torch.Generator().manual_seed(0)), dim=1)
        shuffled = probs.gather(2, perm[:, None, :, None].expand_as(probs)).mean(dim=0)
        self.store[self.name] = (probs.mean(dim=(1, 2)), entropy.mean(dim=(1, 2)), spatial.mean(dim=(1, 2)),
                                 _location_tv(pattern).expand(b), _location_tv(shuffled).expand(b), probs.mean(dim=1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def _location_tv(pattern: torch.Tensor) -> torch.Tensor:
    """Mean total variation between each pixel's distribution and the pixels' mean, (heads, pixels, L) -> ()."""
    return 0.5 * (pattern - pattern.mean(dim=1, keepdim=True)).abs().sum(-1).mean()


def position_alignment(maps: torch.Tensor, positions: list[str]) -> float:
    """Does a position word's attention point to its place? ``maps``: (B, pixels) attention on the position words per
    pixel (pixels row-major over a square grid), ``positions``: each sample's position. For each position, the mean map
    of its samples minus the mean of all positions' mean maps, correlated over the pixels with the closeness to that
    position's anchor (``world.ANCHOR``, minus the distance); the mean over positions. Positive when the words'
    attention peaks at their places (maps that equal each anchor's closeness give 0.80 on a 6 px grid: the maps' mean
    takes some of each one's shape), 0 when it does not depend on the word, negative when it peaks away from them."""
    side = math.isqrt(maps.shape[1])
    if side * side != maps.shape[1]:
        raise ValueError(f"{maps.shape[1]} pixels: not a square grid")
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    values = sorted(set(positions))
    means = torch.stack([maps[[i for i, v in enumerate(positions) if v == value]].mean(0) for value in values])
    corrs = []
    for value, deviation in zip(values, means - means.mean(0)):
        ax, ay = world.ANCHOR[value]
        closeness = -((x - ax) ** 2 + (y - ay) ** 2).sqrt().flatten()
        varies = deviation.abs().max() > 1e-6 * means.abs().max()  # else the word changes nothing but rounding
        corrs.append(torch.corrcoef(torch.stack([deviation, closeness]))[0, 1] if varies else torch.tensor(0.0))
    return torch.stack(corrs).mean().item()


@torch.no_grad()
def text_attention(comp, prompts, ts=(100, 400, 700, 900)) -> list[dict]:
    """Share of each cross-attention layer's attention on each token group (``TOKEN_GROUPS``), mean over prompts, its
    relative entropy, its spatial variation and the part of it that depends on the place (with that part's chance
    level; ``_AttentionRecorder``), and whether the position words' attention points to their places
    (``position_alignment``, with its standard deviation over 20 shuffles of the prompts' positions), for the
    renders of ``prompts`` noised to each t (the same noise as ``text_effect``);
    "all" is the layers' mean. Uniform attention would give each group its share of the tokens. At low t the noised
    render already shows the object in its place, so attention that follows the picture's content aligns too; at high
    t the picture is mostly noise."""
    attrs = [world.parse_prompt(p) for p in prompts]
    x0 = world.render(attrs, torch.Generator().manual_seed(0))
    embeds = encode_prompts(comp, prompts, "cpu", x0.shape[-1]).embeds
    groups = [token_groups(comp.tokenizers[0], p) for p in prompts]
    positions = [a.position for a in attrs]
    position_tokens = torch.tensor([[g == "position" for g in row] for row in groups]).float()  # B, L
    gen = torch.Generator().manual_seed(0)
    shuffles = [torch.randperm(len(prompts), generator=gen).tolist() for _ in range(20)]
    onehot = torch.tensor([[[g == name for name in TOKEN_GROUPS] for g in row] for row in groups]).float()  # B, L, G
    layers = {n: m for n, m in comp.unet.named_modules() if n.endswith("attn2")}
    store, inner = {}, {n: m.processor for n, m in layers.items()}
    for n, m in layers.items():
        m.set_processor(_AttentionRecorder(inner[n], store, n))
    alphas = comp.scheduler.alphas_cumprod.float()
    rows = []
    try:
        for t in ts:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            a = alphas[t]
            comp.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, torch.full((len(prompts),), t),
                      encoder_hidden_states=embeds)
            shares = {n: torch.einsum("bl,blg->g", store[n][0], onehot) / len(prompts) for n in layers}
            shares["all"] = torch.stack(list(shares.values())).mean(0)
            stats = {k: {n: store[n][i].mean() for n in layers}
                     for i, k in ((1, "entropy"), (2, "spatial_tv"), (3, "location_tv"), (4, "location_tv_chance"))}
            pos_maps = {n: torch.einsum("bnl,bl->bn", store[n][5], position_tokens) for n in layers}
            stats["position_alignment"] = {n: torch.tensor(position_alignment(m, positions))
                                           for n, m in pos_maps.items()}
            # its spread by chance: the same maps under the prompts' positions shuffled (20 fixed shuffles)
            stats["position_alignment_chance_sd"] = {
                n: torch.tensor([position_alignment(m, [positions[i] for i in perm]) for perm in shuffles]).std()
                for n, m in pos_maps.items()}
            for v in stats.values():
                v["all"] = torch.stack(list(v.values())).mean()
            rows.append({"t": t, **{n: {**{g: round(v.item(), 4) for g, v in zip(TOKEN_GROUPS, s)},
                                        **{k: round(v[n].item(), 4) for k, v in stats.items()}}
                                    for n, s in shares.items()}})
    finally:
        for n, m in layers.items():
            m.set_processor(inner[n])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toyworld:base")
    p.add_argument("--cfg", default="1,3,5,9", help="CFG scales at 20 steps, eta 1 (comma-separated)")
    p.add_argument("--sampler", default="20,1;50,1;20,0", help="steps,eta pairs at CFG 5 (semicolon-separated)")
    p.add_argument("--prompts", type=int, default=64, help="probe prompts (default 64)")
    p.add_argument("--seeds", type=int, default=4, help="noise seeds per prompt of quality_spread (default 4)")
    p.add_argument("--ts", default="100,400,700,900",
                   help="timesteps of the text effect and the attention (comma-separated, 0..999)")
    p.add_argument("--parts", type=lambda v: v.split(","), default=list(PARTS),
                   help=f"what to measure, comma-separated (default: all of {','.join(PARTS)})")
    args = p.parse_args(argv)
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts={','.join(args.parts)}: accepted: a comma-separated subset of {','.join(PARTS)}")
    try:
        ts = tuple(int(t) for t in args.ts.split(","))
    except ValueError:
        ts = ()
    if args.seeds < 2:
        p.error(f"--seeds={args.seeds}: accepted: 2 or more (a spread within a prompt needs two samples)")
    if not ts or not all(0 <= t <= 999 for t in ts):
        p.error(f"--ts={args.ts}: accepted: comma-separated integer timesteps in 0..999")
    comp = load_components(str(resolve_model_path(args.model)), "sd15")
    prompts = world.probe_prompts()[:args.prompts]
    runs = [(20, 1.0, float(g)) for g in args.cfg.split(",") if g]
    runs += [(int(n), float(e), 5.0) for n, e in (x.split(",") for x in args.sampler.split(";") if x)]
    parts = {"samples": lambda: [sample_stats(comp, prompts, *r) for r in runs],
             "text_effect_mse": lambda: text_effect(comp, prompts, ts),
             "attribute_swap": lambda: attribute_swap(comp, prompts, ts),
             "text_attention": lambda: text_attention(comp, prompts, ts),
             "layout": lambda: layout(comp, prompts),
             "quality_spread": lambda: quality_spread(comp, prompts, runs, args.seeds)}
    report = {name: run() for name, run in parts.items() if name in args.parts}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
