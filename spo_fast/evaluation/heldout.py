"""The evaluation's library half: base vs trained on the same noise, the statistics, the grid.

For each of ``n_prompts`` evaluation prompts and each of ``seeds`` noise seeds (``seed_offset`` ..
``seed_offset + seeds - 1``; 0 .. ``seeds - 1`` by default), the base model and the trained model (base + LoRA, or a
fine-tuned UNet) sample from the *same* initial noise and the same per-step DDIM noise, with the run's sampling
settings (steps, eta, guidance, negative prompt). Rewards:

- toy world (``ground_truth_reward``): the ground-truth score (``spo_fast.toyworld.world.score``), which no
  model was trained on;
- real models: a scorer at t = 0 (``scorer_reward``: the SPM, or a plain CLIP-style reward model such as a local
  PickScore).

``eval.json``: ``n_prompts``, ``n_seeds``, ``seed_offset`` (the first noise seed), ``reward_base`` and
``reward_trained`` (means over prompt x seed), ``win_rate`` (fraction of prompt/seed pairs where trained > base;
exact ties count as losses and are reported as ``ties``), ``reward_base_seed_spread`` (std over seeds of the base
model's per-seed mean reward; ``null`` with one seed: the file is strict JSON, :mod:`spo_fast.core.jsonio`) and
``margin`` = trained - base, ``seconds``; with the ground truth also the mean of each score component.
``eval_grid.png`` (``spo_fast.evaluation.grids.labelled_grid``): ``grid_prompts`` prompts chosen to cover the set's
words (``eval.grid_prompts``, default 8; ``grids.covering``) at the first noise seed (``seed_offset``), base (top)
above trained (bottom), each
image upscaled and captioned with its prompt, its reward written under it, the mean rewards and the win rate in a
header line. The command line is ``spo_fast.evaluate``; the trainer calls ``evaluate`` here at the end of a run.

More metrics (``metrics``: reward callables such as ``spo_fast.reward.metrics``' PickScore, HPSv2, ImageReward, Aesthetic)
score the same images; ``eval.json``'s ``metrics`` then holds, per metric (the main reward first), the mean and
standard error of base and trained, the paired margin and its standard error, the win rate and ties, and ``eval.md``
is a markdown table in the paper's layout (a row per model, a column per metric).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from spo_fast.core import jsonio
from spo_fast.diffusion.models import Components, decode_latents, encode_negative, encode_prompts
from spo_fast.diffusion.sampling import DDIMSchedule, sample

GRID_PROMPTS = 8


@torch.no_grad()
def generate(comp: Components, unet, schedule: DDIMSchedule, prompts: list[str], seeds: int, guidance_scale: float,
             eta: float, batch_size: int, device, base_seed: int = 0, resolution: int | None = None,
             latent_shape=None, backend: str | None = None, negative_prompt: str = "", bar=None,
             seed_offset: int = 0) -> torch.Tensor:
    """(seeds, P, 3, H, W) images in [-1, 1] at the noise seeds ``seed_offset`` .. ``seed_offset + seeds - 1``
    (``bar``: a progress bar advanced once per sampled chunk). The noise of (seed s, prompt chunk c) is a pure
    function of (base_seed, s, c) (and of the step op's backend, ``backend``): two models called with the same
    arguments see identical noise, and seed s is the same whatever ``seeds`` and ``seed_offset`` select it. The
    unconditional branch is ``negative_prompt`` (``models.encode_negative``: zeros for an empty one on SDXL)."""
    latent_shape = latent_shape or comp.latent_shape
    res = resolution or latent_shape[1] * comp.vae_scale_factor
    out = []
    if seed_offset < 0:
        raise ValueError(f"seed_offset={seed_offset}: noise seeds start at 0")
    for s in range(seed_offset, seed_offset + seeds):
        rows = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            gen = torch.Generator(device=device).manual_seed((base_seed * 7919 + s) * 1_000_003 + start)
            cond = encode_prompts(comp, chunk, device, res)
            uncond = encode_negative(comp, negative_prompt, len(chunk), device, res)
            x = torch.randn((len(chunk), *latent_shape), generator=gen, device=device)
            rows.append(decode_latents(comp, sample(unet, schedule, cond, uncond, x, guidance_scale, eta, gen,
                                                           backend=backend)).cpu())
            if bar is not None:
                bar.update(1)
        out.append(torch.cat(rows))
    return torch.stack(out)


def ground_truth_reward(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from spo_fast.toyworld import world

    return world.score_prompts(images, prompts), world.score_components(
        images, [world.parse_prompt(p) for p in prompts])


def _source_digest(module: str) -> str:
    import hashlib
    import importlib.util

    return hashlib.sha256(Path(importlib.util.find_spec(module).origin).read_bytes()).hexdigest()[:16]


ground_truth_reward.label = "ground truth"  # how the grid's header names the reward
# what the base-evaluation cache (spo_fast.evaluation.base_cache) keys the reward by: the scoring code itself
ground_truth_reward.cache_id = f"ground truth {_source_digest('spo_fast.toyworld.world')}"


def all_toy_prompts(prompts: list[str]) -> bool:
    """Every prompt is a toy-world prompt (so the ground truth can score it)."""
    from spo_fast.toyworld import world

    try:
        for p in prompts:
            world.parse_prompt(p)
    except ValueError:
        return False
    return True


def scorer_reward(scorer, label: str = "scorer at t = 0") -> Callable:
    """A training scorer (SPM, colour) as a reward: scored at t = 0."""
    def reward(images: torch.Tensor, prompts: list[str]):
        state = scorer.prepare(prompts)
        t0 = torch.zeros(len(prompts), dtype=torch.long)
        return scorer.score(images, t0, state, torch.arange(len(prompts))).float().cpu(), {}
    reward.label = label
    return reward


def score(images: torch.Tensor, prompts: list[str], reward: Callable) -> tuple[torch.Tensor, dict]:
    """Rewards of (S, P, ...) images of one model: (S, P) float64 and the reward's components (a dict of flat
    tensors; empty without)."""
    seeds = images.shape[0]
    # scored in fp32 whatever autocast the sampling ran under (sampling.dtype=bf16): the reward is the measurement
    with torch.autocast(images.device.type, enabled=False):
        r, components = reward(images.flatten(0, 1).float(), prompts * seeds)
    return r.view(seeds, -1).double(), components


def rewards(base: torch.Tensor, trained: torch.Tensor, prompts: list[str], reward: Callable):
    """Rewards of (S, P, ...) images from both models: (S, P) float64 base and trained rewards and the reward's
    components (dicts of flat tensors; empty without)."""
    (rb, comp_b), (rt, comp_t) = score(base, prompts, reward), score(trained, prompts, reward)
    return rb, rt, comp_b, comp_t


def compare(base: torch.Tensor, trained: torch.Tensor, prompts: list[str], reward: Callable) -> dict:
    """Rewards of (S, P, ...) images from both models -> the eval.json statistics."""
    return statistics(*rewards(base, trained, prompts, reward), prompts)


def statistics(rb: torch.Tensor, rt: torch.Tensor, comp_b: dict, comp_t: dict, prompts: list[str]) -> dict:
    """(S, P) rewards of both models (and their components) -> the eval.json statistics."""
    seeds = rb.shape[0]
    per_seed_base = rb.mean(1)
    spread = per_seed_base.std().item() if seeds > 1 else float("nan")
    m = metric_statistics(rb, rt)
    result = {
        "n_prompts": len(prompts), "n_seeds": seeds, "reward_base": m["base"], "reward_trained": m["trained"],
        # margin_se: the margin's standard error over the S * P paired images, how far the margin moves when the
        # trained model's small changes re-draw individual images (the seed spread is the base's own variation)
        "margin": m["margin"], "margin_se": m["margin_se"], "win_rate": m["win_rate"], "ties": m["ties"],
        "reward_base_seed_spread": spread,
        "reward_base_per_seed": per_seed_base.tolist(), "reward_trained_per_seed": rt.mean(1).tolist(),
    }
    if comp_b:
        result["components_base"] = {k: v.double().mean().item() for k, v in comp_b.items()}
        result["components_trained"] = {k: v.double().mean().item() for k, v in comp_t.items()}
    return result


def metric_statistics(rb: torch.Tensor, rt: torch.Tensor) -> dict:
    """One metric's (S, P) rewards of both models -> means, standard errors (over the S * P images), the paired
    margin with its standard error, the win rate (trained > base) and ties."""
    n = rb.numel()

    def se(x: torch.Tensor) -> float:
        return (x.std() / n ** 0.5).item() if n > 1 else float("nan")

    d = rt - rb
    return {"base": rb.mean().item(), "base_se": se(rb), "trained": rt.mean().item(), "trained_se": se(rt),
            "margin": d.mean().item(), "margin_se": se(d), "win_rate": (rt > rb).double().mean().item(),
            "ties": int((rt == rb).sum()), "n": n}


# The paper's numbers (docs/method.md): its prompts and seeds, not this evaluation's; printed beside ours in
# eval.md for orientation only.
PAPER = {
    "sd15": {"base": {"PickScore": 20.53, "HPSv2": 23.79, "ImageReward": -0.163, "Aesthetic": 5.365},
             "Diffusion-DPO": {"PickScore": 20.98, "HPSv2": 25.05, "ImageReward": 0.112, "Aesthetic": 5.505},
             "SPO": {"PickScore": 21.43, "HPSv2": 26.45, "ImageReward": 0.171, "Aesthetic": 5.887}},
    "sdxl": {"base": {"PickScore": 21.95, "HPSv2": 26.95, "ImageReward": 0.538, "Aesthetic": 5.950},
             "Diffusion-DPO": {"PickScore": 22.64, "HPSv2": 29.31, "ImageReward": 0.944, "Aesthetic": 6.015},
             "SPO": {"PickScore": 23.06, "HPSv2": 31.80, "ImageReward": 1.080, "Aesthetic": 6.364}},
}


def eval_markdown(result: dict, names: tuple[str, str] = ("base", "trained"), family: str | None = None,
                  settings: str = "") -> str:
    """``eval.md``: the metrics of ``result["metrics"]`` in the paper's layout (a row per model, a column per metric:
    mean ± standard error), then the paired margin and win rate per metric and, for ``family`` sd15/sdxl, the
    paper's rows for the metrics it reports (its prompts and seeds: orientation, not a like-for-like comparison)."""
    metrics = result["metrics"]
    cols = list(metrics)
    about = (f"{result['n_prompts']} prompts x {result['n_seeds']} noise seeds (seed {result.get('seed_offset', 0)} "
             f"first), the same noise for both models{'; ' + settings if settings else ''}. Mean ± standard error "
             "over the images.")
    lines = [f"# Evaluation: {names[1]} vs {names[0]}", "", about, "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, key in ((names[0], "base"), (names[1], "trained")):
        lines.append(f"| {label} | " + " | ".join(f"{metrics[c][key]:.4g} ± {metrics[c][key + '_se']:.2g}"
                                                    for c in cols) + " |")
    lines.append("| margin (trained - base) | " + " | ".join(
        f"{metrics[c]['margin']:+.4g} ± {metrics[c]['margin_se']:.2g}" for c in cols) + " |")
    lines.append("| win rate (trained > base) | " + " | ".join(f"{metrics[c]['win_rate']:.3f}" for c in cols) + " |")
    paper = PAPER.get(family or "")
    shared = [c for c in cols if paper and c in paper["SPO"]]
    if shared:
        title = (f"The paper's {family.upper().replace('SD15', 'SD1.5')} table (its own prompts and seeds; for "
                 "orientation only):")
        lines += ["", title, "", "| paper | " + " | ".join(shared) + " |", "|---|" + "---|" * len(shared)]
        lines += [f"| {row} | " + " | ".join(f"{paper[row][c]:g}" for c in shared) + " |" for row in paper]
    return "\n".join(lines) + "\n"


def save_grid(base: torch.Tensor, trained: torch.Tensor, path: Path, prompts: list[str],
              base_rewards: list[float] | None = None, trained_rewards: list[float] | None = None,
              header: str | None = None, n: int = GRID_PROMPTS) -> None:
    """eval_grid.png: base (top row) above trained (bottom row) at the first noise seed (``base[0]``) for ``n``
    prompts chosen to cover the prompt set's words (``grids.covering``: colours, shapes, positions ...), each
    column captioned with its prompt, each image's reward under it ("base 3.21", "trained 5.08";
    green where the trained image beats the base one, red where it is worse), ``header`` on top
    (``spo_fast.evaluation.grids``)."""
    from spo_fast.evaluation.grids import compare_colours, covering, labelled_grid

    idx = covering(prompts, n)
    notes = colours = None
    if base_rewards is not None and trained_rewards is not None:
        rb, rt = [base_rewards[i] for i in idx], [trained_rewards[i] for i in idx]
        notes = [[f"base {v:.2f}" for v in rb], [f"trained {v:.2f}" for v in rt]]
        colours = compare_colours(rb, rt)
    labelled_grid([base[0, idx], trained[0, idx]], ["base", "trained"], [prompts[i] for i in idx], notes, header,
                  note_colours=colours).save(path)


def grid_header(r: dict, label: str, n: int) -> str:
    """The eval grid's header line: the statistics of the whole evaluation and what the grid shows."""
    return (f"{r['n_prompts']} prompts x {r['n_seeds']} seeds, reward = {label}: base {r['reward_base']:.3f} -> "
            f"trained {r['reward_trained']:.3f} (margin {r['margin']:+.3f}), win rate {r['win_rate']:.3f}. "
            f"Shown: {n} prompts that cover the set's words, at noise seed {r.get('seed_offset', 0)}.")


def evaluate(comp: Components, base_ctx, trained_ctx, prompts: list[str], seeds: int, reward: Callable,
             out: Path, sampling, batch_size: int, device, latent_shape=None, backend: str | None = None,
             progress: bool = True, grid_prompts: int = GRID_PROMPTS, seed_offset: int = 0,
             metrics: tuple = (), markdown: dict | None = None, base_cache=None) -> dict:
    """Run both models on the same noise (noise seeds ``seed_offset`` .. ``seed_offset + seeds - 1``), score, write
    eval.json and eval_grid.png (``grid_prompts`` prompts that cover the set's words, at the first of those seeds)
    into ``out`` (a
    progress bar with the time left unless ``progress`` is false). ``metrics``: more reward callables (each with a
    ``label``) scored on the same images, one after the other (a metric with a ``release()`` has it called after
    its scoring: a reward model loaded on first use is freed before the next one loads); with them or with
    ``markdown`` (keyword arguments of ``eval_markdown``), eval.json's ``metrics`` (the main reward first) and
    ``eval.md``. ``base_cache`` (a ``spo_fast.evaluation.base_cache.BaseEvalCache``): the base's rewards and grid
    images are read from an earlier run's exact entry when there is one, and stored otherwise (not with
    ``metrics``, nor for a reward without a ``cache_id``); eval.json's ``base_cache`` says which happened."""
    from tqdm.auto import tqdm

    from spo_fast.evaluation.grids import covering

    t0 = time.perf_counter()
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, sampling.num_steps, device=device)
    gen_args = (seeds, sampling.guidance_scale, sampling.eta, batch_size, device)
    gen_kw = {"latent_shape": latent_shape, "backend": backend, "seed_offset": seed_offset,
              "negative_prompt": getattr(sampling, "negative_prompt", "")}
    n = min(grid_prompts, len(prompts))
    grid_idx = covering(prompts, n)
    cacheable = base_cache is not None and not metrics and getattr(reward, "cache_id", None) is not None
    images, cached = {}, None
    chunks = -(-len(prompts) // batch_size)
    with tqdm(total=2 * seeds * chunks, desc="evaluating base vs trained", unit="batch", disable=not progress,
              mininterval=1.0) as bar:
        for name, ctx in (("base", base_ctx), ("trained", trained_ctx)):
            bar.set_postfix_str(name, refresh=False)
            with ctx as unet:
                if name == "base" and cacheable:
                    cached = _lookup_base(base_cache, comp, unet, schedule, prompts, gen_args, gen_kw, reward,
                                          grid_idx)
                    if cached is not None:
                        bar.update(seeds * chunks)
                        continue
                images[name] = generate(comp, unet, schedule, prompts, *gen_args, bar=bar, **gen_kw)
    if cached is None:
        rb, comp_b = score(images["base"], prompts, reward)
        if cacheable:
            from spo_fast.evaluation.base_cache import Entry, to_pixels

            base_cache.store(Entry(rb, comp_b, to_pixels(images["base"][0, grid_idx])))
        base_first = images["base"]
    else:
        rb, comp_b = cached.rewards, cached.components
        base_first = images["trained"][:1].clone()  # the grid reads the base's first seed at grid_idx only
        base_first[0, grid_idx] = cached.grid_images()
    rt, comp_t = score(images["trained"], prompts, reward)
    result = statistics(rb, rt, comp_b, comp_t, prompts)
    result["seed_offset"] = seed_offset
    result["base_cache"] = "off" if not cacheable else "hit" if cached is not None else "stored"
    getattr(reward, "release", lambda: None)()
    if metrics or markdown is not None:
        result["metrics"] = {getattr(reward, "label", "reward"): metric_statistics(rb, rt)}
        for metric in metrics:
            mb, mt, _, _ = rewards(images["base"], images["trained"], prompts, metric)
            result["metrics"][metric.label] = metric_statistics(mb, mt)
            getattr(metric, "release", lambda: None)()  # a lazily loaded reward model frees its memory
    result["seconds"] = time.perf_counter() - t0
    result["prompts"] = prompts
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(jsonio.dumps(result, indent=1) + "\n")
    if "metrics" in result:
        (out / "eval.md").write_text(eval_markdown(result, **(markdown or {})))
    save_grid(base_first, images["trained"], out / "eval_grid.png", prompts, rb[0].tolist(), rt[0].tolist(),
              grid_header(result, getattr(reward, "label", "reward"), n), n)
    return result


def base_scores(comp: Components, unet, schedule: DDIMSchedule, prompts: list[str], gen_args: tuple, gen_kw: dict,
                reward: Callable, cache=None, grid_prompts: int = GRID_PROMPTS):
    """The base model's (S, P) rewards and their components without its images: from ``cache``'s entry (a
    ``BaseEvalCache``, or None for none) when it has this base and protocol, else sampled, scored and stored there.
    The entry is the one ``evaluate`` with the same arguments reads and writes. Returns (rewards, components,
    "hit" / "stored" / "off")."""
    from spo_fast.evaluation.grids import covering

    grid_idx = covering(prompts, min(grid_prompts, len(prompts)))
    if cache is not None:
        cached = _lookup_base(cache, comp, unet, schedule, prompts, gen_args, gen_kw, reward, grid_idx)
        if cached is not None:
            return cached.rewards, cached.components, "hit"
    images = generate(comp, unet, schedule, prompts, *gen_args, **gen_kw)
    rb, comp_b = score(images, prompts, reward)
    if cache is None:
        return rb, comp_b, "off"
    from spo_fast.evaluation.base_cache import Entry, to_pixels

    cache.store(Entry(rb, comp_b, to_pixels(images[0, grid_idx])))
    return rb, comp_b, "stored"


def _lookup_base(cache, comp: Components, unet, schedule: DDIMSchedule, prompts: list[str], gen_args: tuple,
                 gen_kw: dict, reward: Callable, grid_idx: list[int]):
    """``cache``'s entry for this base and protocol on this machine (``spo_fast.evaluation.base_cache``), or None."""
    import dataclasses

    from spo_fast.evaluation.base_cache import protocol_digest

    seeds, guidance, eta, batch_size, device = gen_args
    latent_shape = gen_kw["latent_shape"] or comp.latent_shape
    res = latent_shape[1] * comp.vae_scale_factor
    cond = []
    for start in range(0, len(prompts), batch_size):
        c = encode_prompts(comp, prompts[start:start + batch_size], device, res)
        cond += [v for v in (c.embeds, c.pooled, c.time_ids) if v is not None]
    u = encode_negative(comp, gen_kw["negative_prompt"], 1, device, res)
    cond += [v for v in (u.embeds, u.pooled, u.time_ids) if v is not None]
    dev = torch.device(device).type
    settings = {"prompts": prompts, "seeds": seeds, "guidance": guidance, "eta": eta, "batch_size": batch_size,
                "latent_shape": list(latent_shape), "num_steps": len(schedule.timesteps), "grid_idx": grid_idx,
                "autocast": str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None,
                **{k: v for k, v in gen_kw.items() if k != "latent_shape"}}
    key = protocol_digest(comp, unet, schedule, cond, settings, reward.cache_id)
    first_step = dataclasses.replace(schedule, timesteps=schedule.timesteps[:1])
    return cache.lookup(lambda: generate(comp, unet, first_step, prompts[:batch_size], 1, guidance, eta, batch_size,
                                         device, **gen_kw), key)


def summary_line(r: dict) -> str:
    offset, n = r.get("seed_offset", 0), r["n_seeds"]
    seeds = "" if not offset else f" (noise seed {offset})" if n == 1 else f" (noise seeds {offset}..{offset + n - 1})"
    return (f"{r['n_prompts']} prompts x {r['n_seeds']} seeds{seeds}: reward base {r['reward_base']:.3f} -> trained "
            f"{r['reward_trained']:.3f} (margin {r['margin']:+.3f}, base seed spread "
            f"{r['reward_base_seed_spread']:.3f}), win rate {r['win_rate']:.3f}")
