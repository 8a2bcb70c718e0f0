"""SPO training recipe: ``python -m spo_fast.train [RECIPE] [key=value ...]``.

setup (config -> checks -> models -> LoRA -> optimizer -> resume), then per iteration:
prompts -> text embeddings (once per prompt) -> rollout (no grad) -> shuffled fixed-size
micro-batches of transitions -> one reference and one policy forward each -> SPO loss ->
backward -> (accumulate) clip, step -> metrics, checkpoint. At the end: LoRA weights in
diffusers format, a before/after sample grid and, with eval.enabled, the held-out evaluation.

Multi-process: ``accelerate launch -m spo_fast.train RECIPE ...`` (any accelerate config).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, available_recipes, load_config, save_config
from .data import PromptSampler, load_prompts
from .kernels.spo_loss import spo_loss
from .models import (
    Components,
    ModelDirError,
    check_model_dir,
    decode_latents,
    encode_prompts,
    load_components,
    resolve_model_path,
)
from .rollout import RolloutBuffer, rollout
from .sampling import DDIMSchedule, cfg_model_output, ddim_step_stats, sample
from .scorers import build_scorer


# ----------------------------------------------------------------------------- fast checks
def check_output_dir(path: str) -> Path:
    """Create the output dir and prove it is writable, before anything heavy happens."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"log.output_dir={path!r} is not writable ({e.strerror}); "
                          "choose a directory you can write to, e.g. log.output_dir=./outputs/run") from e
    return out


def preflight(cfg: Config) -> tuple[Path, list[str], Path]:
    """Every cheap check of the inputs: output dir, prompts, model directory layout, scorer, evaluation."""
    out = check_output_dir(cfg.log.output_dir)
    prompts = load_prompts(cfg.data.prompts)
    if cfg.scorer.name == "spm":
        spm_dir = resolve_model_path(cfg.scorer.path)
        if not (spm_dir / "config.json").is_file():
            raise ConfigError(f"scorer.path={cfg.scorer.path!r}: {spm_dir} is not a CLIP/SPM directory (no "
                              "config.json); give a local SPM directory or toyworld:spm")
    if cfg.eval.enabled:
        eval_prompts(cfg)
    model_dir = resolve_model_path(cfg.model.path)
    check_model_dir(model_dir, cfg.model.family, cfg.model.init)
    if cfg.train.batch_size > len(prompts):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(prompts)} prompts of "
                          f"data.prompts={cfg.data.prompts!r}; lower the batch size or add prompts")
    return out, prompts, model_dir


def eval_prompts(cfg: Config) -> list[str]:
    """The evaluation prompts; with the ground-truth reward every one must be a toy-world prompt."""
    prompts = load_prompts(cfg.eval.prompts)[:cfg.eval.n_prompts]
    if cfg.eval.reward == "ground_truth":
        from .toyworld import world

        for p in prompts:
            try:
                world.parse_prompt(p)
            except ValueError as e:
                raise ConfigError(f"eval.reward=ground_truth needs toy-world prompts (eval.prompts=toyworld:heldout); "
                                  f"{e}; use eval.reward=scorer for other prompts") from e
    return prompts


def run_eval(cfg: Config, s: Setup, accelerator, scorer, out: Path) -> dict:
    """The end-of-run evaluation: base (adapters off) vs trained on the same noise (spo_fast.evaluate)."""
    from .evaluate import evaluate, ground_truth_reward, scorer_reward

    reward = ground_truth_reward if cfg.eval.reward == "ground_truth" else scorer_reward(scorer)
    s.raw_unet.eval()
    with accelerator.autocast():
        return evaluate(s.comp, reference_unet(s), contextlib.nullcontext(s.raw_unet), eval_prompts(cfg),
                        cfg.eval.seeds, reward, out, cfg.sampling, cfg.eval.batch_size, accelerator.device,
                        latent_shape=s.latent_shape, backend=kernel_backend(cfg))


# ----------------------------------------------------------------------------- model setup
@dataclass
class Setup:
    comp: Components
    unet: torch.nn.Module  # the (DDP-)wrapped policy UNet
    raw_unet: torch.nn.Module  # the unwrapped policy UNet
    ref_unet: torch.nn.Module | None  # frozen copy, full fine-tuning only
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: DDIMSchedule
    latent_shape: tuple[int, int, int]
    weight_dtype: torch.dtype


def build(cfg: Config, accelerator) -> Setup:
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    dev = accelerator.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    comp = load_components(cfg.model.path, cfg.model.family, cfg.model.init, cfg.model.seed)
    if comp.vae is not None:
        _place(comp.vae, dev, torch.float32 if comp.vae.config.get("force_upcast", False) else weight_dtype)
    for te in comp.text_encoders:
        _place(te, dev, weight_dtype)
    unet, ref_unet = comp.unet, None
    if cfg.lora.enabled:
        _place(unet, dev, weight_dtype)
        unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha or cfg.lora.rank,
                                    init_lora_weights="gaussian", target_modules=list(cfg.lora.targets)))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    else:
        unet.to(dev)
        ref_unet = _place(copy.deepcopy(unet), dev, weight_dtype).eval().requires_grad_(False)
        unet.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"lora.targets={cfg.lora.targets} matched no UNet module; "
                          "use attention projections such as to_q,to_k,to_v,to_out.0")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.adam_eps)
    # Stepped by us once per optimizer step (accelerate would step it num_processes times).
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.train.warmup_steps)
    wrapped, optimizer = accelerator.prepare(unet, optimizer)
    schedule = DDIMSchedule.from_scheduler(comp.scheduler, cfg.sampling.num_steps, device=dev)
    latent_shape = comp.latent_shape
    if cfg.model.resolution:
        f = comp.vae_scale_factor
        if cfg.model.resolution % (8 * f):
            raise ConfigError(f"model.resolution={cfg.model.resolution} must be a multiple of {8 * f}")
        latent_shape = (latent_shape[0], cfg.model.resolution // f, cfg.model.resolution // f)
    return Setup(comp, wrapped, unet, ref_unet, params, optimizer, lr_scheduler, schedule, latent_shape,
                 weight_dtype)


def _place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move (components load in fp32; casting only when needed avoids diffusers' cast warning)."""
    return module.to(device) if dtype == torch.float32 else module.to(device, dtype)


@contextlib.contextmanager
def reference_unet(s: Setup):
    """The frozen reference: LoRA adapters disabled on the same UNet, or the frozen copy."""
    if s.ref_unet is not None:
        yield s.ref_unet
        return
    s.raw_unet.disable_adapters()
    try:
        yield s.raw_unet
    finally:
        s.raw_unet.enable_adapters()


def decoder(comp: Components):
    return functools.partial(decode_latents, comp)


def image_resolution(s: Setup) -> int:
    return s.latent_shape[1] * s.comp.vae_scale_factor


# ----------------------------------------------------------------------------- train step
def micro_batches(buf: RolloutBuffer, batch: int, micro: int, generator: torch.Generator):
    """Shuffled (slots, prompts) index pairs of fixed size ``micro``, grouped by ``shared``."""
    for shared in (True, False):
        slots = torch.tensor([i for i, s in enumerate(buf.shared) if s == shared], dtype=torch.long)
        if len(slots) == 0:
            continue
        pairs = torch.cartesian_prod(slots, torch.arange(batch)).view(-1, 2)
        pairs = pairs[torch.randperm(len(pairs), generator=generator)]
        for chunk in pairs.split(micro):
            yield shared, chunk[:, 0].to(buf.t.device), chunk[:, 1].to(buf.t.device)


def transition_loss(cfg: Config, s: Setup, buf: RolloutBuffer, cond, uncond, shared: bool,
                    slot: torch.Tensor, b: torch.Tensor):
    """SPO loss of transitions (slot[n], b[n]): one reference and one policy forward serve win and lose."""
    n = len(slot)
    x_t = buf.x_t[slot, :, b]  # (n, 2, C, H, W)
    x_prev = buf.x_prev[slot, :, b]  # (n, 2, C, H, W)
    t = buf.t[slot]
    c, u = cond[b], uncond[b]
    if shared:
        x_in, t_in = x_t[:, 0], t
    else:  # SDXL inner steps: win and lose chains have their own x_t
        x_in, t_in = torch.cat([x_t[:, 0], x_t[:, 1]]), torch.cat([t, t])
        c, u = type(c).cat([c, c]), type(u).cat([u, u])
    g, eta = cfg.sampling.guidance_scale, cfg.sampling.eta
    with torch.no_grad(), reference_unet(s) as ref:
        _, mu_ref, _ = ddim_step_stats(s.schedule, cfg_model_output(ref, x_in, t_in, c, u, g), x_in, t_in, eta)
    _, mu_pol, std = ddim_step_stats(s.schedule, cfg_model_output(s.unet, x_in, t_in, c, u, g), x_in, t_in, eta)
    if not shared:
        mu_pol, mu_ref, std = mu_pol.view(2, n, *mu_pol.shape[1:]), mu_ref.view(2, n, *mu_ref.shape[1:]), std[:n]
    return spo_loss(mu_pol, mu_ref, x_prev[:, 0], x_prev[:, 1], std, buf.valid[slot, b].float(),
                    cfg.spo.beta, cfg.spo.ratio_clip, backend=kernel_backend(cfg))


def kernel_backend(cfg: Config) -> str | None:
    """The kernels' ``backend`` argument: ``torch``/``triton`` win over SPO_FAST_KERNELS; ``auto`` defers to it."""
    return None if cfg.train.kernels == "auto" else cfg.train.kernels


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by global norm (unscaling fp16 grads first); returns the norm before clipping (a tensor:
    no host sync)."""
    if max_norm > 0:
        return accelerator.clip_grad_norm_(params, max_norm)
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def rollout_generator(cfg: Config, iteration: int, rank: int, device) -> torch.Generator:
    """Noise of rollout ``iteration`` on process ``rank``: a pure function of (seed, iteration, rank)."""
    return torch.Generator(device=device).manual_seed((cfg.train.seed * 1_000_003 + iteration) * 4099 + rank)


# ----------------------------------------------------------------------------- outputs
class StopFlag:
    """First SIGINT/SIGTERM: finish the iteration, checkpoint, exit. Second SIGINT: abort now."""

    def __init__(self):
        self.set = False
        self._old = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n[spo_fast] signal {signum}: stopping after this iteration (a checkpoint will be written); "
              "press Ctrl-C again to abort now", file=sys.stderr)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def save_lora(s: Setup, out: Path) -> Path:
    """LoRA weights in diffusers format (``pipe.load_lora_weights(dir)``), or the full UNet."""
    if s.ref_unet is not None:
        target = out / "unet"
        s.raw_unet.save_pretrained(target)
        return target
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(s.raw_unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    pipe_cls = StableDiffusionXLPipeline if s.comp.family == "sdxl" else StableDiffusionPipeline
    target = out / "lora"
    pipe_cls.save_lora_weights(save_directory=str(target), unet_lora_layers=layers, safe_serialization=True)
    return target


@torch.no_grad()
def sample_grid(cfg: Config, s: Setup, accelerator, prompts: list[str], scorer, out: Path) -> dict:
    """Base vs trained images for the first prompts, same noise; PNG grid + scores at t = 0."""
    from PIL import Image

    n = min(cfg.log.sample_prompts, len(prompts))
    prompts = prompts[:n]
    res = image_resolution(s)
    cond = encode_prompts(s.comp, prompts, accelerator.device, res)
    uncond = encode_prompts(s.comp, [cfg.sampling.negative_prompt] * n, accelerator.device, res)
    decode, state = decoder(s.comp), scorer.prepare(prompts)
    rows, scores = [], {}
    for name in ("base", "trained"):
        gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed + 12345)
        x = torch.randn((n, *s.latent_shape), generator=gen, device=accelerator.device)
        ctx = reference_unet(s) if name == "base" else contextlib.nullcontext(s.raw_unet)
        with ctx as unet, accelerator.autocast():
            img = decode(sample(unet, s.schedule, cond, uncond, x, cfg.sampling.guidance_scale, cfg.sampling.eta, gen,
                                backend=kernel_backend(cfg)))
        t0 = torch.zeros(n, dtype=torch.long, device=img.device)
        scores[name] = scorer.score(img, t0, state, torch.arange(n, device=img.device)).tolist()
        rows.append(((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)  # (2H, nW, 3)
    scale = max(1, 256 // res)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(
        out / "samples.png")
    result = {"prompts": prompts, "rows": ["base", "trained"], "scores": scores}
    (out / "samples.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- the run
def train(cfg: Config) -> dict:
    """Run SPO training as configured; returns a summary dict. Raises ConfigError/ModelDirError early."""
    return run(cfg)[0]


def run(cfg: Config) -> tuple[dict, Setup]:
    """``train``, also returning the trained models (for tests and notebooks)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out, prompts, _ = preflight(cfg)
    use_tb = cfg.log.tensorboard and _has_tensorboard()
    # Several processes and no CUDA: accelerate only picks its gloo CPU backend when told cpu=True
    # (its own --cpu launch flag needs MPI), so say it here; `accelerate launch --multi_gpu` then works.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with="tensorboard" if use_tb else None,
                              project_dir=str(out), cpu=multi_cpu)
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 is not supported on CPU; use bf16 or no")
    if torch.cuda.is_available() and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.train.seed)
    main = accelerator.is_main_process
    say = (lambda *a: print("[spo_fast]", *a, flush=True)) if main else (lambda *a: None)
    say(f"output dir: {out.resolve()}")
    if main:
        save_config(cfg, out / "config.yaml")

    s = build(cfg, accelerator)
    scorer = build_scorer(cfg.scorer, accelerator.device)
    sampler = PromptSampler(prompts, cfg.train.batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.train.seed)
    total = sampler.iterations_for(cfg.train.epochs)
    if cfg.train.max_iterations:
        total = min(total, cfg.train.max_iterations) if cfg.train.epochs > 0 else cfg.train.max_iterations

    start_iter, opt_step = 0, 0
    resume = cfg.checkpoint.resume
    ckpt = None
    if resume == "auto":
        found = list_checkpoints(out)
        ckpt = found[-1] if found else None
    elif resume != "never":
        ckpt = Path(resume).expanduser()
        if not (ckpt / "state.json").is_file():
            raise ConfigError(f"checkpoint.resume={resume!r} is not a checkpoint directory (no state.json); "
                              "use auto, never, or a path like <output_dir>/checkpoints/iter_0000050")
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, s.raw_unet, s.optimizer, s.lr_scheduler)
        start_iter, opt_step = state["iteration"], state["opt_step"]
        say(f"resumed from {ckpt} at iteration {start_iter}")
    if use_tb:
        accelerator.init_trackers("spo", config=_flat(cfg))

    decode = decoder(s.comp)
    res = image_resolution(s)
    # the negative prompt is the same every iteration: encode it once
    uncond = encode_prompts(s.comp, [cfg.sampling.negative_prompt] * cfg.train.batch_size, accelerator.device, res)
    micro = cfg.train.train_batch_size
    accum = cfg.train.grad_accum
    stop = StopFlag()
    stop.install()
    metrics_file = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115 (closed in finally)
    bar = tqdm(total=total, initial=start_iter, disable=not (main and cfg.log.progress), desc="SPO", unit="it")
    profiler = _profiler(cfg, out) if cfg.profile.enabled else contextlib.nullcontext()
    last = {}
    try:
        with profiler as prof:
            for it in range(start_iter, total):
                t0 = time.perf_counter()
                batch_prompts = sampler.batch(it)
                gen = rollout_generator(cfg, it, accelerator.process_index, accelerator.device)
                cond = encode_prompts(s.comp, batch_prompts, accelerator.device, res)
                noise = torch.randn((len(batch_prompts), *s.latent_shape), generator=gen, device=accelerator.device)
                s.raw_unet.eval()
                with accelerator.autocast():
                    buf = rollout(s.raw_unet, s.schedule, cond, uncond, scorer, scorer.prepare(batch_prompts),
                                  decode, noise, cfg.spo, cfg.sampling, gen, backend=kernel_backend(cfg))
                s.raw_unet.train()
                shuffle = torch.Generator().manual_seed(cfg.train.seed * 7919 + it)
                losses, accs, norms = [], [], []
                batches = list(micro_batches(buf, len(batch_prompts), micro, shuffle))
                for m, (shared, slot, b) in enumerate(batches):
                    sync = (m + 1) % accum == 0
                    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(s.unet)
                    with ctx, accelerator.autocast():
                        lo = transition_loss(cfg, s, buf, cond, uncond, shared, slot, b)
                    accelerator.backward(lo.loss / accum)
                    losses.append(lo.loss.detach())
                    accs.append(lo.accuracy)
                    if sync:
                        norms.append(clip_gradients(accelerator, s.params, cfg.train.max_grad_norm))
                        s.optimizer.step()
                        s.lr_scheduler.step()
                        s.optimizer.zero_grad(set_to_none=True)
                        opt_step += 1
                stats = torch.stack([torch.stack(losses).mean(), torch.stack(accs).mean(), buf.valid.float().mean(),
                                     buf.final_scores.mean().float(),
                                     torch.stack([n.float().to(buf.t.device) for n in norms]).mean()]).float()
                stats = accelerator.reduce(stats, reduction="mean").tolist()
                dt = time.perf_counter() - t0
                last = {"iteration": it + 1, "opt_step": opt_step, "loss": stats[0], "implicit_acc": stats[1],
                        "valid_ratio": stats[2], "reward": stats[3], "grad_norm": stats[4],
                        "lr": s.lr_scheduler.get_last_lr()[0],
                        "samples_per_s": len(batch_prompts) * accelerator.num_processes / dt, "seconds": dt}
                if (it + 1) % cfg.log.every == 0 or it + 1 == total:
                    if main:
                        metrics_file.write(json.dumps(last) + "\n")
                        metrics_file.flush()
                    if use_tb:
                        accelerator.log({k: v for k, v in last.items() if k != "iteration"}, step=it + 1)
                bar.update(1)
                bar.set_postfix(loss=f"{stats[0]:.4f}", acc=f"{stats[1]:.2f}", valid=f"{stats[2]:.2f}",
                                sps=f"{last['samples_per_s']:.2f}")
                if prof is not None:
                    prof.step()
                stopping = _agree(accelerator, stop.set)
                every = cfg.checkpoint.every
                if stopping or it + 1 == total or (every and (it + 1) % every == 0):
                    path = save_checkpoint(accelerator, out, it + 1, opt_step, s.raw_unet, s.optimizer,
                                           s.lr_scheduler, cfg.checkpoint.keep)
                if stopping:
                    say(f"stopped at iteration {it + 1} (checkpoint {path}); run the same command again to resume")
                    return {"stopped": True, **last}, s
    finally:
        stop.restore()
        bar.close()
        if metrics_file:
            metrics_file.close()

    summary = {"stopped": False, "iterations": total, **last}
    if main:
        summary["lora_dir"] = str(save_lora(s, out))
        if cfg.log.sample_prompts:
            summary["samples"] = sample_grid(cfg, s, accelerator, prompts, scorer, out)
        if cfg.eval.enabled:
            from .evaluate import summary_line

            say(f"evaluating base vs trained on {cfg.eval.n_prompts} x {cfg.eval.seeds} held-out prompt/seed pairs")
            result = run_eval(cfg, s, accelerator, scorer, out)
            summary["eval"] = {k: v for k, v in result.items() if k != "prompts"}
            say("eval: " + summary_line(result))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        say(f"done: {total} iterations; weights in {summary['lora_dir']}; outputs in {out.resolve()}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary, s


def _agree(accelerator, flag: bool) -> bool:
    """All processes stop together when any of them was signalled."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def _flat(cfg: Config) -> dict:
    from .config import to_dict
    flat = {}
    for sec, vals in to_dict(cfg).items():
        for k, v in vals.items():
            flat[f"{sec}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _profiler(cfg: Config, out: Path):
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    p = cfg.profile
    return profile(activities=acts, schedule=schedule(wait=p.wait, warmup=p.warmup, active=p.active, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(out / "profile")), record_shapes=True)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m spo_fast.train",
        description="Step-aware Preference Optimization (SPO) for Stable Diffusion 1.5 / SDXL. With no "
                    "arguments it trains the embedded default recipe on CPU.",
        epilog="recipes: " + ", ".join(available_recipes()) + ". Example: python -m spo_fast.train sd15_spo "
               "model.path=/models/sd15 log.output_dir=outputs/sd15",
    )
    parser.add_argument("items", nargs="*", metavar="RECIPE | key=value",
                        help="a recipe (name in configs/ or .yaml path), then dotted overrides like train.lr=3e-5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    recipe = args.items[0] if args.items and "=" not in args.items[0] else None
    overrides = args.items[1:] if recipe else args.items
    return recipe, overrides, args.print_config


def main(argv: list[str] | None = None) -> int:
    recipe, overrides, print_only = parse_args(argv)
    try:
        cfg = load_config(recipe, overrides)
        if print_only:
            import yaml

            from .config import to_dict
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        train(cfg)
    except (ConfigError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
