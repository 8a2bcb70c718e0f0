"""SPO vs Diffusion-DPO at equal cost: ``python -m spo_fast.compare`` (and ``python -m spo_fast.compare tune-dpo``).

One command trains SPO (the ``toy_spo`` recipe) and Diffusion-DPO (``toy_dpo``) from the same base model,
evaluates each at ``--points`` regular points of its run with one held-out protocol, and writes ``compare.json`` and
``compare.png`` (reward and win rate against training cost) into ``--out`` (default ``outputs/compare``).

**Cost units** (logged by the trainer itself, per iteration, in each run's ``metrics.jsonl``; the formulas are
``spo_fast.methods.spo.iteration_cost`` and ``spo_fast.methods.dpo.iteration_cost``, tested against a count of real UNet calls):

- ``unet_fwd_eq``, UNet forward-equivalents: one UNet forward of one sample = 1; a classifier-free-guidance call on
  N samples (both halves in one batch) = 2N; a backward = 2 forwards. SPO: its rollout (plain steps, the shared
  x_t, the pooled calls on the B*k candidates; the last segment has no UNet call) and its training (per
  micro-batch of m transitions: reference and policy forward with CFG and the backward, 8m). DPO: per micro-batch
  of n pairs, reference and policy forward on the 2n winners and losers (no CFG, as the official training) and
  the backward, 8n.
- ``spm_fwd``: images scored by SPO's step-aware preference model (B*k per rollout segment); DPO has none.
- ``train_seconds``: wall-clock seconds of the training iterations only (the sum of ``metrics.jsonl``'s
  ``seconds``: the rollout or batch, forwards, backwards, optimizer), without model loading, evaluation or
  checkpoints.

Not on either curve's x axis: the cost of DPO's data. Each shipped toy pair is two base-model samples of the
rollout's sampler (DDIM ``num_steps`` steps with CFG), 2 * 2 * num_steps forward-equivalents per pair; compare.json
reports it for the unique pairs the DPO run used (``pair_production``). The preference model's own training (it
labels SPO's pools; the ground truth labelled DPO's pairs) is counted for neither.

**Protocol.** The evaluation is the end-of-run one (``spo_fast.evaluation.heldout``: ``eval.n_prompts`` prompts x
``eval.seeds`` seeds, base and trained model from the same noise, the toy world's ground-truth reward, win rate =
share of prompt/seed pairs where the trained model scores higher, ties counting as losses), run on the trained LoRA
at iterations ceil(j * total / points), j = 1..points, from a trainer hook between iterations (training is not
perturbed: its noise is a pure function of the iteration). The prompts are ``toyworld:test`` (64 held-out
prompts, every colour in its share) or, with ``--split validation``, ``toyworld:validation`` (64 others with the same
colours, for choosing settings; ``spo_fast.toyworld.world.test_prompts``).
The base model's images are the same at every point and for both methods (same noise, same sampler), so their
rewards are computed once per process, or read from the disk cache that the end-of-run evaluation also uses
(``spo_fast.evaluation.base_cache``: exact, keyed by the base, the protocol and this machine's arithmetic): a point
costs only the trained model's samples. The base model is point 0 (cost 0) of both curves.

**DPO gets a fair chance.** ``tune-dpo`` trains DPO on a grid of lr x beta (x ``--seeds``) and evaluates each at
``--points`` points on the validation split only; every point is a candidate run length, and ``tune_dpo.json``'s
chosen setting is the (lr, beta, run length) with the highest lowest validation margin over the seeds
(``TUNE_RULE``); ``--dpo-from tune_dpo.json`` (or ``--dpo-lr``/``--dpo-beta``) makes the comparison use it.

**Summary.** The smallest SPO cost (forward-equivalents, and separately seconds; linear interpolation between
points) at which SPO's reward reaches DPO's final reward, and its ratio to DPO's final cost (and, for
forward-equivalents, to DPO's training plus its pairs' production); null with a reason when SPO never reaches it.
Each point is one evaluation of eval.n_prompts x eval.seeds samples: differences within the base model's seed
spread (reported) are noise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spo_fast.core import jsonio
from spo_fast.core.errors import ArgumentParser, DivergedError, InputError

DEFAULT_OUT = "outputs/compare"
SPLITS = {"test": "toyworld:test", "validation": "toyworld:validation"}
TUNE_LRS = (3e-4, 1e-3)
TUNE_BETAS = (1000.0, 5000.0)
COST_KEYS = ("unet_fwd_eq", "spm_fwd")
NOTES = [
    ("unet_fwd_eq: UNet forward-equivalents (one UNet forward of one sample = 1, a CFG call on N samples = 2N, a "
     "backward = 2 forwards), cumulative over training, logged per iteration by the trainer (metrics.jsonl)."),
    "spm_fwd: images scored by SPO's step-aware preference model during its rollouts (DPO: 0).",
    ("train_seconds: wall-clock seconds of the training iterations only (no model loading, evaluation or "
     "checkpoints); DPO's include reading and decoding its pairs (no latent cache in the toy recipe)."),
    ("DPO's pair production (two base-model samples per pair with the rollout sampler) is reported in "
     "methods.DPO.pair_production and is not on the curves' x axis."),
    "The step-aware preference model's own training cost is counted for neither method.",
    "Point 0 of each curve is the base model (cost 0); its reward is the base reward of the same protocol.",
]


class CompareError(InputError):
    """Bad input: printed as one ``error: ...`` line, exit code 2."""


# ----------------------------------------------------------------------------- pure helpers
def eval_iterations(total: int, points: int) -> list[int]:
    """The 1-based iterations evaluated: ceil(j * total / points) for j = 1..points (fewer when points > total)."""
    return sorted({max(1, math.ceil(j * total / points)) for j in range(1, points + 1)})


def cost_to_reach(points: list[dict], key: str, target: float) -> float | None:
    """The smallest ``key`` (a cumulative cost) at which the reward reaches ``target``, interpolating linearly
    between consecutive points (in order of cost); None when no point reaches it."""
    prev = None
    for p in points:
        x, r = p[key], p["reward"]
        if r >= target:
            if prev is None or prev[1] >= target:
                return float(x)
            x0, r0 = prev
            return float(x0 + (target - r0) / (r - r0) * (x - x0))
        prev = (x, r)
    return None


def summarize(spo_points: list[dict], dpo_points: list[dict], pair_fwd_eq: int | None = None) -> dict:
    """SPO's cost to reach DPO's final reward, as a ratio of DPO's final cost (forward-equivalents and seconds;
    with ``pair_fwd_eq``, also of DPO's training plus the production of its pairs)."""
    final = dpo_points[-1]
    out = {"target": "DPO final reward", "dpo_final_reward": final["reward"],
           "spo_final_reward": spo_points[-1]["reward"],
           "dpo_final_unet_fwd_eq": final["unet_fwd_eq"], "dpo_final_train_seconds": final["train_seconds"]}
    for key in ("unet_fwd_eq", "train_seconds"):
        x = cost_to_reach(spo_points, key, final["reward"])
        out[f"spo_{key}_to_reach"] = x
        out[f"ratio_{key}"] = None if x is None or not final[key] else x / final[key]
    if pair_fwd_eq is not None:
        x, total = out["spo_unet_fwd_eq_to_reach"], final["unet_fwd_eq"] + pair_fwd_eq
        out["ratio_unet_fwd_eq_incl_dpo_pairs"] = None if x is None or not total else x / total
    if out["spo_unet_fwd_eq_to_reach"] is None:
        out["reason"] = (f"SPO's best reward over its points ({max(p['reward'] for p in spo_points):.4f}) stays "
                         f"below DPO's final reward ({final['reward']:.4f})")
    elif out["spo_unet_fwd_eq_to_reach"] == 0:
        out["reason"] = "DPO's final reward is not above the base model's: SPO 'reaches' it at cost 0"
    else:
        out["reason"] = None
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_Parser = ArgumentParser  # argparse with one-line errors (``error: ...``, exit 2) instead of usage + error


# ----------------------------------------------------------------------------- configs
@dataclass
class RunSpec:
    """One training run of the comparison: its method label, recipe, config and output directory."""

    label: str  # "SPO" | "DPO" | "DPO lr=... beta=..."
    recipe: str
    overrides: list[str]
    cfg: object = None
    method: object = None
    total: int = 0


def _base_overrides(out: Path, split: str) -> list[str]:
    """What every run of the comparison sets before the user's overrides: quiet, no end-of-run extras, a fresh
    run (no resume), the evaluation prompts of ``split``."""
    return ["log.progress=false", "log.report_to=none", "log.sample_prompts=0", "eval.enabled=false",
            "checkpoint.every=0", "checkpoint.keep=1", "checkpoint.resume=never", f"log.output_dir={out}",
            f"eval.prompts={SPLITS[split]}"]


def make_spec(label: str, recipe: str, method: str, out: Path, split: str, extra: list[str]) -> RunSpec:
    """Resolve the config (recipe <- compare's settings <- ``extra``) and check it is a ``method`` run."""
    from spo_fast.core.config import ConfigError, load_config

    overrides = _base_overrides(out, split) + list(extra)
    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as e:
        raise CompareError(f"{label}: {e}") from e
    if cfg.method != method:
        raise CompareError(f"{label}: recipe {recipe!r} with the overrides is a method={cfg.method} run; the {label} "
                           f"side needs method={method}")
    return RunSpec(label, recipe, list(extra), cfg)


def protocol(cfg) -> dict:
    """What must agree between two runs for their evaluations (and their shared base rewards) to be comparable."""
    import torch

    from spo_fast.core.config import sampling_dtype
    from spo_fast.core.trainer import kernel_backend

    s, e, m = cfg.sampling, cfg.eval, cfg.model
    return {"model": m.path, "family": m.family, "resolution": m.resolution,
            "prompts": e.prompts, "n_prompts": e.n_prompts, "seeds": e.seeds, "reward": e.reward,
            "eval_batch_size": e.batch_size, "num_steps": s.num_steps, "eta": s.eta,
            "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt,
            "sampling_dtype": sampling_dtype(cfg, "cuda" if torch.cuda.is_available() else "cpu"),
            "kernels": kernel_backend(cfg),
            # how the UNets sample (trainer.sampling_unet): plain copies, with the chunked CPU attention or not
            "sampling_unet": ("plain, chunked attention" if s.chunked_attention else "plain") if s.merge_lora
            else "adapters"}


def preflight(specs: list[RunSpec]) -> None:
    """Every cheap check of every run (models, prompts, pairs, output dirs) before any model is built, and that all
    runs share one evaluation protocol."""
    from spo_fast.core.trainer import preflight as trainer_preflight
    from spo_fast.core.trainer import run_length
    from spo_fast.train import make_method

    first = protocol(specs[0].cfg)
    for spec in specs:
        p = protocol(spec.cfg)
        diff = sorted(k for k in first if first[k] != p[k])
        if diff:
            raise CompareError(f"{spec.label} is evaluated differently from {specs[0].label} ("
                               + ", ".join(f"{k}: {first[k]!r} vs {p[k]!r}" for k in diff)
                               + "); both methods need the same evaluation protocol and sampler")
        spec.method = make_method(spec.cfg)
        try:
            trainer_preflight(spec.cfg, spec.method)
        except (InputError, OSError) as e:
            raise CompareError(f"{spec.label}: {_one_line(e)}") from e
        spec.total = run_length(spec.cfg, _epoch_iterations(spec))


def _epoch_iterations(spec: RunSpec) -> int:
    """``method.epoch_iterations`` without building anything (one process)."""
    cfg, m = spec.cfg, spec.method
    if cfg.method == "dpo":
        return m.ds.iterations_for(cfg.train.epochs, cfg.train.batch_size, 1)
    from spo_fast.data import PromptSampler

    return PromptSampler(m.prompts, cfg.train.batch_size, 1, 0, cfg.train.seed).iterations_for(cfg.train.epochs)


# ----------------------------------------------------------------------------- evaluation at points
def _autocast(cfg, device):
    """``trainer.sampling_autocast`` without the accelerator (the evaluation's autocast, ``sampling.dtype``)."""
    import torch

    from spo_fast.core.config import sampling_dtype

    dtype = sampling_dtype(cfg, device.type)
    if dtype == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if dtype == "fp16" else torch.bfloat16)


@dataclass
class BaseRewards:
    """The base model's evaluation rewards, per protocol (the same at every point and for both methods): sampled
    once per process, or read from the disk's base-evaluation cache (``spo_fast.evaluation.base_cache``; ``use_cache``
    is false when a run sets ``eval.base_cache=false``)."""

    use_cache: bool = True
    scores: dict = field(default_factory=dict)  # json(protocol) -> ((S, P) rewards, their components)
    cache_status: dict = field(default_factory=dict)  # json(protocol) -> "hit" / "stored" / "off"
    seconds: float = 0.0


@dataclass
class PointEvaluator:
    """The trainer hook: adds up each iteration's costs and seconds, and at the evaluation iterations scores the
    trained LoRA against the base model's rewards (``BaseRewards``; ``spo_fast.evaluation.heldout``)."""

    spec: RunSpec
    points: int
    base: BaseRewards
    bar: object = None
    rows: list = field(default_factory=list)  # one dict per evaluated point
    base_stats: dict | None = None
    cum: dict = field(default_factory=lambda: {"unet_fwd_eq": 0.0, "spm_fwd": 0.0, "train_seconds": 0.0})
    eval_seconds: float = 0.0

    def __call__(self, it: int, total: int, s, row: dict) -> None:
        for k in COST_KEYS:
            self.cum[k] += float(row.get(k) or 0.0)
        self.cum["train_seconds"] += float(row["seconds"])
        todo = eval_iterations(total, self.points)
        if it + 1 in todo:
            if self.bar is not None:
                self.bar.set_postfix_str(f"evaluating {todo.index(it + 1) + 1}/{len(todo)}")
            stats = self.evaluate(s)
            self.rows.append({"iteration": it + 1, "opt_step": row.get("opt_step"),
                              "unet_fwd_eq": round(self.cum["unet_fwd_eq"]), "spm_fwd": round(self.cum["spm_fwd"]),
                              "train_seconds": self.cum["train_seconds"],
                              "reward": stats["reward_trained"], "win_rate": stats["win_rate"],
                              "margin": stats["margin"], "margin_se": stats["margin_se"], "ties": stats["ties"],
                              "reward_per_seed": stats["reward_trained_per_seed"],
                              "eval_seconds": stats["seconds"]})
            if self.bar is not None:
                self.bar.set_postfix_str(f"reward {stats['reward_trained']:.3f} win {stats['win_rate']:.2f}")
        if self.bar is not None:
            self.bar.update(1)

    def evaluate(self, s) -> dict:
        """base (cached) vs the trained model on the evaluation prompts and seeds: ``evaluation.statistics``' dict."""
        import torch

        from spo_fast.core.trainer import eval_prompts, kernel_backend, sampling_unet
        from spo_fast.diffusion.sampling import DDIMSchedule
        from spo_fast.evaluation.heldout import (
            base_scores,
            generate,
            ground_truth_reward,
            score,
            scorer_reward,
            statistics,
        )

        t0 = time.perf_counter()
        cfg = self.spec.cfg
        device = next(s.raw_unet.parameters()).device
        prompts = eval_prompts(cfg)
        schedule = DDIMSchedule.from_scheduler(s.comp.scheduler, cfg.sampling.num_steps, device=device)
        kw = {"latent_shape": s.latent_shape, "backend": kernel_backend(cfg), "seed_offset": 0,
              "negative_prompt": cfg.sampling.negative_prompt}
        args = (cfg.eval.seeds, cfg.sampling.guidance_scale, cfg.sampling.eta, cfg.eval.batch_size, device)
        key = jsonio.dumps(protocol(cfg), sort_keys=True)
        reward = ground_truth_reward if cfg.eval.reward == "ground_truth" else scorer_reward(self.spec.method.scorer)
        was_training = s.raw_unet.training
        s.raw_unet.eval()
        try:
            with torch.no_grad(), _autocast(cfg, device):
                if key not in self.base.scores:
                    tb = time.perf_counter()
                    cache = None
                    if self.base.use_cache and getattr(reward, "cache_id", None) is not None:
                        from spo_fast.evaluation.base_cache import BaseEvalCache

                        cache = BaseEvalCache(log=print)  # the trainer's stdout: compare.log
                    with sampling_unet(cfg, s, "base") as unet:  # as the end-of-run evaluation samples
                        rb, comp_b, status = base_scores(s.comp, unet, schedule, prompts, args, kw, reward, cache,
                                                         cfg.eval.grid_prompts)
                    self.base.scores[key], self.base.cache_status[key] = (rb, comp_b), status
                    self.base.seconds += time.perf_counter() - tb
                with sampling_unet(cfg, s, "trained") as unet:
                    trained = generate(s.comp, unet, schedule, prompts, *args, **kw)
                # scored in fp32 (autocast off) whatever the sampling autocast, as the end-of-run evaluation does, so
                # the numbers match eval.json
                rt, comp_t = score(trained, prompts, reward)
                rb, comp_b = self.base.scores[key]
                stats = statistics(rb, rt, comp_b, comp_t, prompts)
        finally:
            s.raw_unet.train(was_training)
        stats["seconds"] = time.perf_counter() - t0
        self.eval_seconds += stats["seconds"]
        if self.base_stats is None:
            self.base_stats = {"reward": stats["reward_base"], "reward_seed_spread": stats["reward_base_seed_spread"],
                               "reward_per_seed": stats["reward_base_per_seed"], "base_cache": self.base.cache_status[key]}
        return stats


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def settings(spec: RunSpec) -> dict:
    """The settings of a run that the comparison reports (the full resolved config is its config.yaml)."""
    c = spec.cfg
    out = {"recipe": spec.recipe, "overrides": spec.overrides, "iterations": spec.total, "lr": c.train.lr,
           "batch_size": c.train.batch_size, "train_batch_size": c.train.train_batch_size,
           "grad_accum": c.train.grad_accum, "lora_rank": c.lora.rank if c.lora.enabled else None,
           "seed": c.train.seed, "output_dir": c.log.output_dir,
           "config_file": str(Path(c.log.output_dir) / "config.yaml")}
    if c.method == "spo":
        out.update(k=c.spo.k, beta=c.spo.beta, threshold=c.spo.threshold, divert_start_step=c.spo.divert_start_step,
                   num_steps=c.sampling.num_steps, scorer=c.scorer.path or c.scorer.name, prompts=c.data.prompts)
    else:
        out.update(beta=c.dpo.beta, empty_prompt_prob=c.dpo.empty_prompt_prob, pairs=c.data.pairs)
    return out


def pair_production(spec: RunSpec) -> dict:
    """What DPO's data cost to make, in UNet forward-equivalents: each pair is two base-model samples of DDIM
    ``num_steps`` steps with CFG (2 * 2 * num_steps), times the unique pairs the run trained on."""
    cfg, ds = spec.cfg, spec.method.ds
    used = set()
    for it in range(spec.total):
        used.update(ds.batch_indices(it, cfg.train.batch_size, 1, 0, cfg.train.seed))
    if cfg.data.pairs == "toyworld:train":
        from spo_fast.toyworld.build import SAMPLER

        steps, source = SAMPLER["num_steps"], "spo_fast.toyworld.build.SAMPLER (the shipped pairs' sampler)"
    else:
        steps, source = cfg.sampling.num_steps, "sampling.num_steps (assumed: the pairs' own sampler is unknown)"
    per_pair = 2 * 2 * steps
    return {"unet_fwd_eq": per_pair * len(used), "unique_pairs_used": len(used), "per_pair": per_pair,
            "num_steps": steps, "num_steps_from": source, "usable_pairs_in_data": len(ds),
            "rows_in_data": ds.counts["rows"], "unet_fwd_eq_all_rows": per_pair * ds.counts["rows"],
            "note": "two base-model samples per pair (DDIM num_steps steps, CFG: 2 forwards per step), for the unique "
                    "pairs of the run's batches; unet_fwd_eq_all_rows counts every sampled pair, ties included. Not "
                    "on the curves' x axis; the preference model's training is counted for neither method."}


# ----------------------------------------------------------------------------- running
def train_and_evaluate(spec: RunSpec, points: int, base: BaseRewards, log, phase: str, progress: bool) -> dict:
    """Train one run with the evaluation hook (its own progress bar, ``phase`` like "[1/2]"); its points (point 0 =
    the base model) and settings. The trainer's own lines go to ``log``."""
    from spo_fast.core.trainer import run

    metrics = Path(spec.cfg.log.output_dir) / "metrics.jsonl"
    if metrics.exists():  # a fresh run (checkpoint.resume=never): the trainer appends to metrics.jsonl
        metrics.unlink()
    with _progress(spec.total, progress, f"{phase} {spec.label}") as bar:
        hook = PointEvaluator(spec, points, base, bar)
        with contextlib.redirect_stdout(log):
            summary, _ = run(spec.cfg, spec.method, hook=hook)
    if summary.get("stopped"):
        raise KeyboardInterrupt
    base_point = {"iteration": 0, "opt_step": 0, "unet_fwd_eq": 0, "spm_fwd": 0, "train_seconds": 0.0,
                  "reward": hook.base_stats["reward"], "win_rate": None, "margin": 0.0, "ties": None}
    result = {"settings": settings(spec), "points": [base_point, *hook.rows],
              "final": hook.rows[-1], "eval_seconds": hook.eval_seconds, "base": hook.base_stats}
    if spec.cfg.method == "dpo":
        result["pair_production"] = pair_production(spec)
    return result


def _progress(total: int, enabled: bool, desc: str):
    """One phase's bar: its training iterations (the evaluations at the points run between them), with the time
    left."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="it", disable=not enabled, dynamic_ncols=True, desc=desc,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} it [{elapsed}<{remaining}{postfix}]")


@contextlib.contextmanager
def _quiet_libraries():
    """transformers' and diffusers' loading bars and warnings off while the runs build their models (restored
    after): the comparison's own bar is the one to watch."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = (tlog.get_verbosity(), dlog.get_verbosity())
    bars = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])
        for mod, on in ((tlog, bars[0]), (dlog, bars[1])):
            if on:
                mod.enable_progress_bar()


def _open_log(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    return open(out / "compare.log", "a")


def run_compare(args, spo: RunSpec, dpo: RunSpec, out: Path) -> dict:
    base = BaseRewards(use_cache=spo.cfg.eval.base_cache and dpo.cfg.eval.base_cache)
    results = {}
    t0 = time.perf_counter()
    with _quiet_libraries(), _open_log(out) as log:
        for i, spec in enumerate((spo, dpo)):
            results[spec.label] = train_and_evaluate(spec, args.points, base, log, f"[{i + 1}/2]", args.progress)
            log.flush()
    base_stats = results["SPO"].pop("base")
    results["DPO"].pop("base")
    report = {
        "protocol": {**protocol(spo.cfg), "split": args.split, "points": args.points,
                     "eval_iterations": {k: [p["iteration"] for p in r["points"][1:]] for k, r in results.items()},
                     "win_rate": "share of prompt/seed pairs where the trained model's reward beats the base "
                                 "model's on the same noise (ties count as losses)"},
        "base": {**base_stats, "seconds": base.seconds},
        "methods": results,
        "summary": summarize(results["SPO"]["points"], results["DPO"]["points"],
                             results["DPO"]["pair_production"]["unet_fwd_eq"]),
        "dpo_settings_from": args.dpo_source,
        "notes": NOTES,
        "seconds": time.perf_counter() - t0,
    }
    report = _nan_to_none(report)
    (out / "compare.json").write_text(jsonio.dumps(report, indent=1) + "\n")
    plot(report, out / "compare.png")
    return report


def plot(report: dict, path: Path) -> None:
    """Reward (top) and win rate (bottom) against UNet forward-equivalents (left) and training seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", constrained_layout=True)
    colors = {"SPO": "tab:blue", "DPO": "tab:orange"}
    base, summ = report["base"], report["summary"]
    for col, (key, label) in enumerate((("unet_fwd_eq", "UNet forward-equivalents (training, cumulative)"),
                                        ("train_seconds", "training wall-clock seconds (cumulative)"))):
        ax_r, ax_w = axes[0, col], axes[1, col]
        for name, res in report["methods"].items():
            pts = res["points"]
            c = colors.get(name)
            ax_r.plot([p[key] for p in pts], [p["reward"] for p in pts], "o-", color=c, label=name)
            wp = [p for p in pts if p["win_rate"] is not None]
            ax_w.plot([p[key] for p in wp], [p["win_rate"] for p in wp], "s--", color=c, label=name)
        ax_r.axhline(base["reward"], color="gray", lw=0.8, ls=":", label="base model")
        ax_r.axhline(summ["dpo_final_reward"], color=colors["DPO"], lw=0.8, ls="--", label="DPO final reward")
        reach = summ.get(f"spo_{key}_to_reach")
        if reach is not None and summ["reason"] is None:  # a real crossing (not "DPO ended below the base")
            ax_r.plot([reach], [summ["dpo_final_reward"]], "x", color=colors["SPO"], ms=10, mew=2,
                      label="SPO reaches it")
        spread = base.get("reward_seed_spread")
        if spread:
            ax_r.axhspan(base["reward"] - spread, base["reward"] + spread, color="gray", alpha=0.12,
                         label="base +- seed spread")
        ax_w.axhline(0.5, color="gray", lw=0.8, ls=":", label="win rate 0.5")
        ax_r.set_ylabel("ground-truth reward (mean)" if report["protocol"]["reward"] == "ground_truth"
                        else "reward (mean)")
        ax_w.set_ylabel("win rate vs base (same noise)")
        ax_w.set_ylim(-0.03, 1.03)
        ax_w.set_xlabel(label)
        for ax in (ax_r, ax_w):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    pp = report["methods"].get("DPO", {}).get("pair_production")
    proto = report["protocol"]
    title = (f"SPO vs Diffusion-DPO: {proto['n_prompts']} {proto['split']} prompts x {proto['seeds']} seeds")
    if pp:
        title += (f"\nnot on the x axis: producing DPO's {pp['unique_pairs_used']} pairs cost "
                  f"{pp['unet_fwd_eq']:,} UNet forward-equivalents")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- tune-dpo
TUNE_RULE = ("the (lr, beta, run length) whose lowest validation margin over the training seeds is the highest (ties: "
             "the higher mean margin, then the shorter run); the run lengths are the evaluation points, each the same "
             "model as a run stopped there (constant lr after warmup, batches a function of the iteration)")


def choose(rows: list[dict]) -> tuple[dict, list[dict]]:
    """DPO's setting from tune-dpo's runs (``rows``: one per lr x beta x seed, each with its ``points``). Every
    evaluation point of a run is a candidate run length; a candidate is scored on every seed of the grid by its
    validation margin, and the chosen one has the highest lowest margin (``TUNE_RULE``). Returns (chosen, every
    candidate)."""
    seeds = sorted({r["seed"] for r in rows})
    by_candidate: dict[tuple, dict] = {}
    for r in rows:
        for p in r["points"][1:]:  # point 0 is the base model
            by_candidate.setdefault((r["lr"], r["beta"], p["iteration"]), {})[r["seed"]] = p
    table = []
    for (lr, beta, iters), by_seed in sorted(by_candidate.items()):
        if sorted(by_seed) != seeds:  # a run length that not every seed evaluated (runs of different lengths)
            continue
        pts = [by_seed[s] for s in seeds]
        margins = [p["margin"] if p["margin"] is not None else -math.inf for p in pts]  # None: a diverged run
        table.append({"lr": lr, "beta": beta, "max_iterations": iters, "seeds": seeds, "margins": margins,
                      "min_margin": min(margins), "mean_margin": sum(margins) / len(margins),
                      "rewards": [p["reward"] for p in pts], "win_rates": [p["win_rate"] for p in pts],
                      "unet_fwd_eq": pts[0]["unet_fwd_eq"]})
    if not table:
        raise CompareError("tune-dpo: no run length was evaluated on every seed (give the runs one length)")
    best = max(table, key=lambda c: (c["min_margin"], c["mean_margin"], -c["max_iterations"]))
    chosen = {**{k: best[k] for k in ("lr", "beta", "max_iterations", "seeds", "margins", "min_margin",
                                      "mean_margin")},
              "reward": _mean([x for x in best["rewards"] if x is not None]),
              "win_rate": _mean([w for w in best["win_rates"] if w is not None]), "rule": TUNE_RULE}
    return chosen, table


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def tune_report(rows: list[dict], proto: dict, base: dict, recipe: str, overrides: list[str], sources=None) -> dict:
    chosen, candidates = choose(rows)
    report = {"split": "validation", "protocol": proto, "base": base, "recipe": recipe, "overrides": overrides,
              "grid": rows, "candidates": candidates, "chosen": chosen}
    if sources:
        report["from_records"] = sources
    return _nan_to_none(report)


def run_tune(args, specs: list[RunSpec], out: Path) -> dict:
    base = BaseRewards(use_cache=all(spec.cfg.eval.base_cache for spec in specs))
    rows = []
    with _quiet_libraries(), _open_log(out) as log:
        for i, spec in enumerate(specs):
            res = train_and_evaluate(spec, args.points, base, log, f"[{i + 1}/{len(specs)}]", args.progress)
            fin, c = res["final"], spec.cfg
            rows.append({"lr": c.train.lr, "beta": c.dpo.beta, "seed": c.train.seed, "reward": fin["reward"],
                         "win_rate": fin["win_rate"],
                         "margin": fin["margin"], "ties": fin["ties"], "iterations": spec.total,
                         "unet_fwd_eq": fin["unet_fwd_eq"], "train_seconds": fin["train_seconds"],
                         "points": res["points"], "output_dir": spec.cfg.log.output_dir})
            log.flush()
            base_stats = res["base"]
    report = tune_report(rows, protocol(specs[0].cfg), base_stats, args.dpo_recipe, args.dpo or [])
    (out / "tune_dpo.json").write_text(jsonio.dumps(report, indent=1) + "\n")
    return report


def _is_seed_override(item: str) -> bool:
    return item.replace(" ", "").startswith("train.seed=")


def _record_seed(row: dict, record: dict, path: Path) -> int:
    """A grid row's training seed: its own ``seed``, or (records of one seed each) the record's train.seed
    override."""
    if row.get("seed") is not None:
        return int(row["seed"])
    seeds = [o.split("=", 1)[1] for o in record.get("overrides") or [] if _is_seed_override(o)]
    if not seeds:
        raise CompareError(f"--from-records {path}: its runs name no training seed (neither a grid row's 'seed' "
                           "nor a train.seed=S override)")
    return int(seeds[-1])


def tune_from_records(paths: list[Path], out: Path) -> dict:
    """tune-dpo's choice over runs already made (e.g. one seed per machine): the grids of several tune_dpo.json
    files, which must share the validation protocol and base, chosen again with ``choose``."""
    rows, first = [], None
    for path in paths:
        if not path.is_file():
            raise CompareError(f"--from-records {path}: no such file (tune-dpo writes OUT/tune_dpo.json)")
        try:
            record = json.loads(path.read_text())
            grid, base, _ = record["grid"], record["base"], record["protocol"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CompareError(f"--from-records {path}: not a tune_dpo.json ({_one_line(e)})") from e
        if first is None:
            first = (path, record)
        ref = first[1]
        for key, what in (("protocol", "evaluation protocol"), ("recipe", "DPO recipe")):
            if record.get(key) != ref.get(key):
                raise CompareError(f"--from-records {path}: another {what} than {first[0]} ({key} differs); "
                                   "only runs evaluated alike can be chosen between")
        if base.get("reward") != ref["base"].get("reward"):
            raise CompareError(f"--from-records {path}: base reward {base.get('reward')} differs from {first[0]}'s "
                               f"{ref['base'].get('reward')} (another base model or machine arithmetic)")
        rows += [{**row, "seed": _record_seed(row, record, path)} for row in grid]
    keys = [(r["lr"], r["beta"], r["seed"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise CompareError("--from-records: the same lr, beta and seed appear twice (give each run once)")
    ref = first[1]
    overrides = [o for o in ref.get("overrides") or [] if not _is_seed_override(o)]
    report = tune_report(rows, ref["protocol"], ref["base"], ref.get("recipe"), overrides,
                         sources=[str(p) for p in paths])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_dpo.json").write_text(jsonio.dumps(report, indent=1) + "\n")
    return report


# ----------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive numbers, e.g. 3e-4,1e-3")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not vals or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct integers, e.g. 0,1,2")
    return vals


def _parser(tune: bool) -> argparse.ArgumentParser:
    if tune:
        p = _Parser(prog="python -m spo_fast.compare tune-dpo",
                    description="Choose Diffusion-DPO's lr, beta and run length on the toy world's VALIDATION "
                                "prompts: train DPO for every lr x beta (x training seed) of the grid, evaluate each "
                                "at --points regular points of its run (ground truth, the comparison's protocol; "
                                "each point is a candidate run length), write tune_dpo.json with every run, every "
                                "candidate and the chosen one: the highest lowest validation margin over the seeds "
                                "(one seed: the highest margin). Then: python -m spo_fast.compare --dpo-from "
                                "OUT/tune_dpo.json.")
    else:
        p = _Parser(prog="python -m spo_fast.compare",
                    description="Train SPO and Diffusion-DPO from the same base model, evaluate each at regular "
                                "points of its run with the same held-out protocol, and plot reward and win rate "
                                "against UNet forward-equivalents and training seconds (compare.json, compare.png). "
                                "Cost units and protocol: the module docstring (python -c 'import spo_fast.compare as "
                                "c; print(c.__doc__)').",
                    epilog="Subcommand: 'python -m spo_fast.compare tune-dpo --help' chooses DPO's lr and beta on "
                           "the validation prompts. Example: python -m spo_fast.compare tune-dpo && python -m "
                           "spo_fast.compare --dpo-from outputs/compare/tune_dpo.json")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                   help=f"output directory (default: {DEFAULT_OUT}); each run trains in a subdirectory of it")
    p.add_argument("--points", type=int, default=1 if tune else 4,
                   help="evaluations per run, at regular iterations (the last at the end of the run)"
                        + ("; each is a candidate run length (default: 1: the end only)" if tune
                           else "; the base model is point 0 (default: 4)"))
    if not tune:
        p.add_argument("--split", choices=tuple(SPLITS), default="test",
                       help="evaluation prompts: test = toyworld:test, 64 held-out prompts of all eight colours "
                            "(default; the reported result); validation = toyworld:validation, 64 others, same "
                            "colours (for tuning)")
        p.add_argument("--spo-recipe", default="toy_spo", help="SPO's recipe (default: toy_spo)")
        p.add_argument("--spo", action="append", metavar="KEY=VALUE", default=None,
                       help="a config override for the SPO run (repeatable), e.g. --spo train.max_iterations=40")
    p.add_argument("--dpo-recipe", default="toy_dpo", help="DPO's recipe (default: toy_dpo)")
    p.add_argument("--dpo", action="append", metavar="KEY=VALUE", default=None,
                   help="a config override for the DPO run(s) (repeatable), e.g. --dpo train.max_iterations=400 "
                        "(toy_dpo's run length: train.max_iterations iterations of train.batch_size pairs)")
    if tune:
        p.add_argument("--lrs", type=_floats, default=list(TUNE_LRS),
                       help="comma-separated learning rates (default: " + ",".join(map(str, TUNE_LRS)) + ")")
        p.add_argument("--betas", type=_floats, default=list(TUNE_BETAS),
                       help="comma-separated dpo.beta values (default: " + ",".join(f"{b:g}" for b in TUNE_BETAS)
                            + ")")
        p.add_argument("--seeds", type=_ints, default=None,
                       help="comma-separated train.seed values: every setting is trained on each, and the choice "
                            "maximizes its lowest margin over them (default: the recipe's train.seed)")
        p.add_argument("--from-records", type=Path, nargs="+", default=None, metavar="FILE",
                       help="train nothing: choose again over the runs of these tune_dpo.json files (e.g. one seed "
                            "per machine; they must share the protocol, recipe and base) and write OUT/tune_dpo.json")
    else:
        p.add_argument("--dpo-lr", type=float, default=None, help="DPO's learning rate (wins over --dpo-from)")
        p.add_argument("--dpo-beta", type=float, default=None, help="DPO's dpo.beta (wins over --dpo-from)")
        p.add_argument("--dpo-from", type=Path, default=None, metavar="FILE",
                       help="take DPO's lr, beta and run length (train.max_iterations, where the file has one; "
                            "a --dpo train.max_iterations=N wins) from the 'chosen' entry of a tune_dpo.json")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke version: 2 iterations per run, 4 sampling steps, 2 prompts x 1 seed "
                        "(applied before --spo/--dpo overrides)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


QUICK = {
    "common": ["train.max_iterations=2", "train.epochs=0", "sampling.num_steps=4", "eval.n_prompts=2", "eval.seeds=1",
               "train.kernels=torch"],
    "spo": ["spo.divert_start_step=2", "spo.k=2", "spo.threshold=0.0", "train.batch_size=2",
            "train.train_batch_size=2"],
    "dpo": ["train.batch_size=4", "train.train_batch_size=2", "train.grad_accum=1"],
}


def _check_overrides(items: list[str] | None, flag: str) -> list[str]:
    items = list(items or [])
    for item in items:
        if "=" not in item or item.startswith("="):
            raise CompareError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} train.max_iterations=40")
        if item.split("=", 1)[0].strip() == "method":
            raise CompareError(f"{flag} {item!r}: each side's method is fixed ({flag} configures the "
                               f"{flag[2:].upper()} run); give another recipe with {flag}-recipe instead")
    return items


def _dpo_from(path: Path) -> tuple[float, float, int | None]:
    """The chosen lr, beta and run length (None in files written before tune-dpo chose one) of a tune_dpo.json."""
    if not path.is_file():
        raise CompareError(f"--dpo-from {path}: no such file (write one with: python -m spo_fast.compare tune-dpo)")
    try:
        chosen = json.loads(path.read_text())["chosen"]
        lr, beta = float(chosen["lr"]), float(chosen["beta"])
        iters = chosen.get("max_iterations")
        iters = None if iters is None else int(iters)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompareError(f"--dpo-from {path}: not a tune_dpo.json with a 'chosen' lr and beta ({_one_line(e)})"
                           ) from e
    return lr, beta, iters


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tune = bool(argv) and argv[0] == "tune-dpo"
    args = _parser(tune).parse_args(argv[1:] if tune else argv)
    try:
        if args.points < 1:
            raise CompareError(f"--points={args.points}: must be >= 1")
        out = args.out.expanduser()
        quick = QUICK["common"] if args.quick else []
        user_dpo = _check_overrides(args.dpo, "--dpo")
        dpo_quick = quick + (QUICK["dpo"] if args.quick else [])
        dpo_extra = dpo_quick + user_dpo
        if tune and args.from_records:
            given = [flag for flag, on in (("--seeds", args.seeds is not None), ("--dpo", bool(args.dpo)),
                                           ("--lrs", args.lrs != list(TUNE_LRS)),
                                           ("--betas", args.betas != list(TUNE_BETAS)), ("--points", args.points != 1),
                                           ("--quick", args.quick)) if on]
            if given:
                raise CompareError(f"--from-records trains nothing: {', '.join(given)} would not apply (the records "
                                   "hold their runs' settings)")
            report = tune_from_records([f.expanduser() for f in args.from_records], out)
            _print_choice(report, out)
            return 0
        if tune:
            args.split = "validation"
            if args.seeds and any(_is_seed_override(o) for o in user_dpo):
                raise CompareError("--seeds with --dpo train.seed=...: give the training seeds with --seeds only")
            specs = [make_spec(f"DPO lr={lr:g} beta={beta:g}" + ("" if seed is None else f" seed={seed}"),
                               args.dpo_recipe, "dpo",
                               out / "tune_dpo" / (f"lr{lr:g}_beta{beta:g}" + ("" if seed is None else f"_seed{seed}")),
                               "validation", dpo_extra + [f"train.lr={lr}", f"dpo.beta={beta}"]
                               + ([] if seed is None else [f"train.seed={seed}"]))
                     for lr in args.lrs for beta in args.betas for seed in (args.seeds or [None])]
        else:
            spo_extra = quick + (QUICK["spo"] if args.quick else []) + _check_overrides(args.spo, "--spo")
            chosen, args.dpo_source = [], "the recipe and --dpo overrides"
            if args.dpo_from is not None:
                lr, beta, iters = _dpo_from(args.dpo_from.expanduser())
                chosen += [f"train.lr={lr}", f"dpo.beta={beta}"]
                if iters is not None:  # before the user's overrides: --dpo train.max_iterations=N wins
                    dpo_extra = dpo_quick + [f"train.max_iterations={iters}"] + user_dpo
                args.dpo_source = str(args.dpo_from)
            if args.dpo_lr is not None:
                chosen.append(f"train.lr={args.dpo_lr}")
                args.dpo_source = "--dpo-lr/--dpo-beta"
            if args.dpo_beta is not None:
                chosen.append(f"dpo.beta={args.dpo_beta}")
                args.dpo_source = "--dpo-lr/--dpo-beta"
            specs = [make_spec("SPO", args.spo_recipe, "spo", out / "spo", args.split, spo_extra),
                     make_spec("DPO", args.dpo_recipe, "dpo", out / "dpo", args.split, dpo_extra + chosen)]
        preflight(specs)
        out.mkdir(parents=True, exist_ok=True)
    except CompareError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        if tune:
            _print_choice(run_tune(args, specs, out), out)
        else:
            report = run_compare(args, *specs, out)
            print(summary_text(report))
            print(f"[spo_fast.compare] wrote {out / 'compare.json'} and {out / 'compare.png'}")
    except InputError as e:  # found only while running (a bad image row of the pairs, ...)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def _print_choice(report: dict, out: Path) -> None:
    c = report["chosen"]
    margins = " / ".join(f"{m:+.4f}" for m in c["margins"])
    print(f"[spo_fast.compare] chose lr={c['lr']:g} beta={c['beta']:g} max_iterations={c['max_iterations']} "
          f"(validation margin {margins} on train.seed {'/'.join(map(str, c['seeds']))}; base "
          f"{report['base']['reward']:.4f}); wrote {out / 'tune_dpo.json'}")


def summary_text(report: dict) -> str:
    """A few lines for the terminal: each method's final point and the cost ratio."""
    proto = report["protocol"]
    lines = [(f"[spo_fast.compare] base reward {report['base']['reward']:.4f} "
              f"({proto['n_prompts']} {proto['split']} prompts x {proto['seeds']} seeds)")]
    for name, res in report["methods"].items():
        f = res["final"]
        lines.append(f"[spo_fast.compare] {name}: reward {f['reward']:.4f}, win rate {f['win_rate']:.3f} after "
                     f"{f['iteration']} iterations, {f['unet_fwd_eq']:,} UNet fwd-eq, {f['train_seconds']:.0f} s")
    s = report["summary"]
    if s["reason"]:  # the caveat instead of a number it makes meaningless (a ratio of 0 when DPO ends below base)
        lines.append(f"[spo_fast.compare] {s['reason']}")
    elif s["ratio_unet_fwd_eq"] is not None:
        sec = "n/a" if s["ratio_train_seconds"] is None else f"{s['ratio_train_seconds']:.2f}"
        lines.append(f"[spo_fast.compare] SPO reaches DPO's final reward at {s['ratio_unet_fwd_eq']:.2f}x DPO's UNet "
                     f"forward-equivalents and {sec}x its training seconds")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
