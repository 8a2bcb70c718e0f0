import pytest

from spo_fast.core.config import Config, ConfigError, available_recipes, load_config, save_config, validate


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_loads_and_validates(recipe, tmp_path):
    cfg = load_config(recipe)
    validate(cfg)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg  # the resolved config round-trips


def test_recipes_start_with_their_command():
    from spo_fast.core.config import configs_dir
    for path in configs_dir().glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "spo_fast.train" in first, path


def test_official_hyperparameters():
    sd15, sdxl = load_config("sd15_spo"), load_config("sdxl_spo")
    assert (sd15.spo.k, sd15.lora.rank, sd15.train.lr, sd15.spo.threshold, sd15.train.batch_size) == (4, 4, 6e-5, 0.3, 10)
    assert (sdxl.spo.k, sdxl.spo.num_inner_steps, sdxl.lora.rank, sdxl.train.lr, sdxl.spo.threshold) == (2, 3, 64, 1e-5, 0.4)
    assert (sdxl.train.batch_size, sdxl.train.grad_accum) == (2, 2)
    for c in (sd15, sdxl):
        assert (c.spo.beta, c.spo.ratio_clip, c.sampling.num_steps, c.sampling.eta, c.sampling.guidance_scale,
                c.spo.divert_start_step, c.train.weight_decay) == (10.0, 0.1, 20, 1.0, 5.0, 4, 1e-4)


def test_overrides_are_typed():
    cfg = load_config("tiny_sd15_color", ["train.lr=3e-5", "spo.k=2", "lora.enabled=false", "lora.targets=[to_q,to_v]",
                                  "log.output_dir=/tmp/x"])
    assert cfg.train.lr == 3e-5 and cfg.spo.k == 2 and cfg.lora.enabled is False
    assert cfg.lora.targets == ["to_q", "to_v"] and cfg.log.output_dir == "/tmp/x"
    assert load_config("tiny_sd15_color", ["output_dir=/tmp/y"]).log.output_dir == "/tmp/y"  # the shorthand


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "train.lrr"),          # unknown key, named, with a suggestion
    ("trian.lr=1", "trian"),               # unknown section
    ("spo.k=four", "spo.k"),               # wrong type
    ("spo.k=1", "spo.k=1"),                # k < 2
    ("spo.threshold=1.0", "spo.threshold"),
    ("spo.threshold=-0.1", "spo.threshold"),
    ("train.mixed_precision=fp8", "fp8"),
    ("lora.enabled=maybe", "lora.enabled"),
    ("method=sft", "method='sft'"),
    ("model.init=pretrained", "model.init=random"),  # arch: dirs have no weights: the fix is named
    ("spo", "key=value"),
    ("spo=3", "section"),
])
def test_config_errors_name_the_problem(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("tiny_sd15_color", [override])
    assert needle in str(e.value)


def test_unknown_yaml_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# cmd\ntrain:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(str(bad))
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="sd15_spo"):
        load_config("sd16_spo")


def test_defaults_equal_dataclass_defaults_where_recipe_is_silent():
    assert load_config("tiny_sd15_color").train.adam_beta2 == Config().train.adam_beta2


def test_real_spo_recipes_use_the_step_aware_preference_model(tmp_path):
    """sd15_spo / sdxl_spo train with an SPM whose path is required: an empty path is a config error, a path that is
    not an SPM directory stops the run before any model is built, naming scorer.path."""
    from spo_fast.train import preflight

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n" * 12)
    for name in ("sd15_spo", "sdxl_spo"):
        cfg = load_config(name)
        assert cfg.scorer.name == "spm" and cfg.scorer.path
        with pytest.raises(ConfigError, match="scorer.path"):
            load_config(name, ["scorer.path="])
        family = cfg.model.family
        cfg = load_config(name, [f"model.path=arch:{family}", "model.init=random", f"data.prompts={prompts}",
                                 f"log.output_dir={tmp_path / name}"])
        with pytest.raises(ConfigError, match=f"scorer.path='{cfg.scorer.path}'"):
            preflight(cfg)


def test_method_keys_left_out_of_the_saved_config(tmp_path):
    for name, absent in (("toy_dpo", "spo"), ("toy_spo", "dpo")):
        cfg = load_config(name)
        save_config(cfg, tmp_path / "c.yaml")
        text = (tmp_path / "c.yaml").read_text()
        assert f"\n{absent}:" not in text and f"method: {cfg.method}" in text
        assert load_config(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("native", [True, False])
def test_bf16_if_native_follows_the_cpu(monkeypatch, native):
    """sampling.dtype=bf16_if_native samples in bf16 only where the CPU computes it natively (AVX512-BF16 or AMX);
    elsewhere bf16 is emulated (17x slower than fp32 on the toy UNet), so it samples in fp32. The toy recipes use it."""
    import torch

    from spo_fast.core.config import native_bf16, sampling_dtype
    from spo_fast.core.trainer import sampling_autocast

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16("cpu") is native
    for recipe in ("toy_spo", "toy_dpo"):
        cfg = load_config(recipe)
        assert cfg.sampling.dtype == "bf16_if_native"
        assert sampling_dtype(cfg, "cpu") == ("bf16" if native else "fp32")
    acc = type("Acc", (), {"device": torch.device("cpu")})()
    with sampling_autocast(cfg, acc):
        assert torch.is_autocast_enabled("cpu") is native
    # the explicit values are kept whatever the CPU
    assert sampling_dtype(load_config("toy_spo", ["sampling.dtype=bf16"]), "cpu") == "bf16"
    assert sampling_dtype(load_config("toy_spo", ["sampling.dtype=fp32"]), "cpu") == "fp32"
    assert sampling_dtype(load_config("toy_spo", ["sampling.dtype=auto", "train.mixed_precision=bf16"]), "cpu") == "bf16"
    with pytest.raises(ConfigError, match="bf16_if_native"):
        load_config("toy_spo", ["sampling.dtype=bf17"])
