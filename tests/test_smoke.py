"""``python -m spo_fast.train RECIPE --smoke``: every recipe runs its whole pipeline in seconds on CPU."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from spo_fast import train
from spo_fast.core.config import available_recipes, load_config, smoke_overrides


def _not_strict(constant: str):
    pytest.fail(f"not strict JSON: {constant}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_has_a_smoke_run_of_seconds(recipe, tmp_path, capsys):
    out = tmp_path / recipe
    t0 = time.perf_counter()
    assert train.main([recipe, "--smoke", f"log.output_dir={out}", "log.progress=false"]) == 0
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"{recipe} --smoke took {seconds:.0f} s"  # measured 3-6 s in-process on 2 cores
    saved = json.loads((out / "summary.json").read_text())
    assert saved["iterations"] == 2 and saved["stopped"] is False
    for f in ("config.yaml", "metrics.jsonl", "samples.png", "eval.json", "eval_grid.png"):
        assert (out / f).is_file(), f
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() or (out / "unet").is_dir()
    assert (out / "checkpoints").is_dir() and (out / "samples" / "iter_0000001.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["opt_steps"] > 0 for r in rows), rows  # training really stepped
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_prompts"] == 4
    # the model card beside the weights, with what it refers to: the folder can be shared as it is
    weights = out / "lora" if (out / "lora").is_dir() else out / "unet"
    card = (weights / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    base = load_config(recipe).model
    assert meta["library_name"] == "diffusers" and meta["base_model"] in (base.path, f"arch:tiny_{base.family}")
    assert ("lora" in meta["tags"]) == (weights.name == "lora")
    assert f"| {ev['reward_base']:.4g} | {ev['reward_trained']:.4g} |" in card and "(eval_grid.png)" in card
    assert (weights / "eval_grid.png").is_file() and (weights / "samples.png").is_file()
    again = load_config(str(weights / "config.yaml"))  # loadable as a recipe: the run's resolved config
    assert again.train.max_iterations == 2 and again.method == load_config(recipe).method
    assert "done: 2 iterations" in capsys.readouterr().out
    for f in [*out.rglob("*.json"), *out.rglob("*.jsonl")]:  # strict JSON, latent-cache manifest included
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            json.loads(line, parse_constant=_not_strict)
    if recipe == "toy_spo":  # spo_fast.evaluate on the run's LoRA samples as the run's own evaluation did
        from spo_fast import evaluate

        assert evaluate.main(["--lora", str(weights), "--n-prompts", "4", "--seeds", "2", "--batch-size", "8",
                              "--num-steps", "4", "--out", str(tmp_path / "again")]) == 0
        cli = json.loads((tmp_path / "again" / "eval.json").read_text())
        assert cli["sampling"]["plain_copies"] and cli["sampling"]["chunked_attention"]
        assert cli["prompts"] == ev["prompts"]
        assert (cli["reward_base"], cli["reward_trained"]) == (ev["reward_base"], ev["reward_trained"])


def test_smoke_overrides_keep_the_recipe_and_the_users_word():
    """Real-model recipes move to their family's tiny random architecture and the toy data; toy recipes keep their
    models; fp16 without CUDA becomes no mixed precision; the user's overrides come after and win."""
    sdxl = load_config("sdxl_spo", ["scorer.path=/x"])
    over = smoke_overrides(sdxl, cuda=False)
    assert "model.path=arch:tiny_sdxl" in over and "train.mixed_precision=no" in over
    assert "log.output_dir=outputs/sdxl_spo_smoke" in over
    assert "train.mixed_precision=no" not in smoke_overrides(sdxl, cuda=True)
    dpo = smoke_overrides(load_config("sd15_dpo", ["data.pairs=/x"]), cuda=False)
    assert "data.pairs=toyworld:train" in dpo and any(o.startswith("data.cache_dir=outputs/sd15_dpo_smoke") for o in dpo)
    toy = smoke_overrides(load_config("toy_spo"), cuda=False)
    assert not any(o.startswith("model.path=") for o in toy)
    cfg = load_config("toy_spo", [*toy, "train.max_iterations=3"])
    assert cfg.train.max_iterations == 3 and cfg.sampling.num_steps == 4
