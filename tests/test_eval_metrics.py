"""The evaluation with several reward models (`evaluate --metric`): eval.json's per-metric statistics, eval.md in the
paper's layout, prompt tables, pipeline directories as the trained model, the real-model sampler defaults, and
bad metric specs named before any model is built."""
import json
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_cli_errors_evaluate import lora_dir, no_models, run_main  # noqa: F401 (fixtures)
from test_rewards import aesthetic_head, clip, clip_dir, tmp  # noqa: F401 (fixtures)

from spo_fast import evaluate as ev
from spo_fast.diffusion.models import resolve_model_path
from spo_fast.evaluation.heldout import PAPER, eval_markdown, metric_statistics
from spo_fast.toyworld import world

FAST = ["--n-prompts", "3", "--seeds", "2", "--num-steps", "2", "--grid-prompts", "1", "--batch-size", "8"]


def test_metric_statistics_by_hand():
    rb = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    rt = torch.tensor([[2.0, 2.0], [5.0, 3.0]], dtype=torch.float64)
    s = metric_statistics(rb, rt)
    d = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    assert s["base"] == 2.5 and s["trained"] == 3.0 and s["margin"] == 0.5 and s["n"] == 4
    assert s["base_se"] == pytest.approx(rb.flatten().std().item() / 2)
    assert s["margin_se"] == pytest.approx(d.std().item() / 2)  # paired: the std of the differences
    assert s["win_rate"] == 0.5 and s["ties"] == 1


def test_eval_markdown_is_the_papers_layout():
    stats = {"base": 20.5, "base_se": 0.05, "trained": 21.25, "trained_se": 0.04, "margin": 0.75, "margin_se": 0.03,
             "win_rate": 0.7, "ties": 0, "n": 500}
    result = {"n_prompts": 500, "n_seeds": 1, "metrics": {"PickScore": stats, "HPSv2": {**stats, "base": 23.0}}}
    md = eval_markdown(result, ("base (sd15)", "trained (lora)"), family="sd15", settings="DDIM 20 steps")
    lines = md.splitlines()
    assert "| model | PickScore | HPSv2 |" in lines
    assert "| base (sd15) | 20.5 ± 0.05 | 23 ± 0.05 |" in lines
    assert "| trained (lora) | 21.25 ± 0.04 | 21.25 ± 0.04 |" in lines
    assert "| win rate (trained > base) | 0.700 | 0.700 |" in lines
    assert f"| SPO | {PAPER['sd15']['SPO']['PickScore']:g} | {PAPER['sd15']['SPO']['HPSv2']:g} |" in lines
    assert "paper" not in eval_markdown(result, family=None)  # the toy world: no paper rows


@pytest.fixture
def prompt_table(tmp_path):
    caps = world.test_prompts()[:3]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": [caps[0], caps[1], caps[0], caps[2]], "label_0": [1, 0, 1, 0]}), path)
    return path, caps


def test_metrics_end_to_end(tmp_path, lora_dir, clip, aesthetic_head, prompt_table, capsys):  # noqa: F811
    clip_path, _ = clip
    head, _ = aesthetic_head
    table, caps = prompt_table
    out = tmp_path / "eval"
    code, stdout, err = run_main(["--lora", str(lora_dir), "--prompts", str(table), *FAST, "--out", str(out),
                                  "--metric", f"clip={clip_path}", "--metric", f"aesthetic={head},{clip_path}"], capsys)
    assert code == 0, err
    r = json.loads((out / "eval.json").read_text())
    assert r["prompts"] == caps  # the table's captions, de-duplicated in order
    assert list(r["metrics"]) == ["ground truth", "CLIP score", "Aesthetic"]
    gt = r["metrics"]["ground truth"]
    assert gt["base"] == pytest.approx(r["reward_base"]) and gt["trained"] == pytest.approx(r["reward_trained"])
    assert gt["win_rate"] == pytest.approx(r["win_rate"]) and gt["n"] == 6
    for m in r["metrics"].values():
        assert {"base", "base_se", "trained", "trained_se", "margin", "margin_se", "win_rate", "ties"} <= m.keys()
        assert m["margin"] == pytest.approx(m["trained"] - m["base"])
    assert r["metrics"]["CLIP score"]["base"] >= 0  # max(100 cos, 0)
    md = (out / "eval.md").read_text()
    assert "| model | ground truth | CLIP score | Aesthetic |" in md and "paper" not in md
    assert "CLIP score: base" in stdout and "eval.md" in stdout
    # toy world: its runs' eta; a LoRA without a run config samples through peft
    assert r["sampling"] == {"num_steps": 2, "eta": 1.0, "guidance_scale": 5.0, "plain_copies": False,
                             "chunked_attention": False}


def test_a_metric_can_lead_and_a_pipeline_dir_is_a_trained_model(tmp_path, clip, capsys):  # noqa: F811
    """--reward spm is not needed for real-model-style evaluations: the first --metric leads; the authors' full
    checkpoints are pipeline directories, whose unet/ is the trained model (here the base's own: margin 0)."""
    clip_path, _ = clip
    pipe = tmp_path / "pipeline"
    shutil.copytree(resolve_model_path("toyworld:base"), pipe)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na painting of a dog\n")  # not toy-world prompts: no ground truth
    out = tmp_path / "eval"
    code, _, err = run_main(["--lora", str(pipe), "--prompts", str(prompts), *FAST, "--out", str(out),
                             "--metric", f"clip={clip_path}"], capsys)
    assert code == 0, err
    r = json.loads((out / "eval.json").read_text())
    assert list(r["metrics"]) == ["CLIP score"] and r["margin"] == 0 and r["ties"] == 4
    assert (out / "eval.md").is_file()


def test_real_models_default_to_plain_ddim():
    args = SimpleNamespace(n_prompts=1, seeds=1, grid_prompts=1, num_steps=20, batch_size=1, seed_offset=0,
                           eta=None, guidance_scale=5.0, model="/models/stable-diffusion-v1-5")
    ev.check_args(args)
    assert args.eta == 0.0
    args.eta, args.model = None, "toyworld:base"
    ev.check_args(args)
    assert args.eta == 1.0


@pytest.mark.parametrize("spec, needle", [
    ("hpsv2=/nonexistent/HPS_v2_compressed.pt,CLIP", "/nonexistent/HPS_v2_compressed.pt"),
    ("pickscore=UNET", "pickscore"),
    ("nonsense=/x", "unknown reward metric 'nonsense'"),
    ("aesthetic=HEAD", "lacks the clip path"),
])
def test_bad_metric_is_one_named_line_before_any_model(tmp_path, lora_dir, clip, aesthetic_head, no_models,  # noqa: F811
                                                       spec, needle, capsys):
    spec = spec.replace("CLIP", str(clip[0])).replace("HEAD", str(aesthetic_head[0])).replace(
        "UNET", str(resolve_model_path("toyworld:base") / "unet"))
    code, _, err = run_main(["--lora", str(lora_dir), *FAST, "--out", str(tmp_path / "o"), "--metric", spec], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_the_authors_lora_file_name_is_accepted(tmp_path, lora_dir, capsys):  # noqa: F811
    """The released SPO LoRA is one diffusers-format safetensors file with its own name
    (spo-sd-v1-5_4k-p_10ep_lora_diffusers.safetensors): a directory holding it is a trained model."""
    theirs = tmp_path / "SPO-SD-v1-5_4k-p_10ep_LoRA"
    theirs.mkdir()
    shutil.copy(lora_dir / "pytorch_lora_weights.safetensors", theirs / "spo-sd-v1-5_4k-p_10ep_lora_diffusers.safetensors")
    out = tmp_path / "eval"
    code, _, err = run_main(["--lora", str(theirs), *FAST, "--out", str(out)], capsys)
    assert code == 0, err
    ours = tmp_path / "ours"
    code, _, err = run_main(["--lora", str(lora_dir), *FAST, "--out", str(ours)], capsys)
    assert code == 0, err
    a, b = (json.loads((d / "eval.json").read_text()) for d in (out, ours))
    assert a["reward_trained"] == b["reward_trained"] and a["reward_base"] == b["reward_base"]


def test_a_real_model_without_a_reward_is_named(tmp_path, lora_dir, no_models, capsys):  # noqa: F811
    """The toy SPM is the default reward of toyworld: models only; a real model needs --metric or --spm."""
    base = tmp_path / "sd15"
    shutil.copytree(resolve_model_path("toyworld:base"), base)
    code, _, err = run_main(["--lora", str(lora_dir), "--model", str(base), *FAST, "--out", str(tmp_path / "o")],
                            capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --model {base}: no reward to evaluate with; give the paper's reward models with "
                          "--metric")
