"""Packaging: kernels/ and configs/ install inside spo_fast, never as top-level modules."""
import importlib.metadata
from pathlib import Path

import spo_fast.configs
import spo_fast.kernels

import spo_fast

REPO = Path(__file__).resolve().parents[1]


def test_kernels_and_configs_are_subpackages_of_spo_fast():
    assert Path(spo_fast.kernels.__file__).resolve().parent.name == "kernels"
    assert Path(spo_fast.configs.__file__).resolve().parent.name == "configs"
    assert (Path(spo_fast.configs.__file__).parent / "toy_spo.yaml").is_file()


def test_installed_distribution_has_no_top_level_kernels():
    # `kernels` is the Hugging Face package diffusers/transformers probe; ours must not shadow it. (From the
    # repo root `import kernels` finds the source folder through the cwd; what matters is the install.)
    dist = importlib.metadata.distribution("spo_fast")
    assert dist.read_text("top_level.txt").split() == ["spo_fast"]
    for f in dist.files or []:
        if str(f).endswith("_finder.py"):  # editable install: its name -> path mapping
            text = Path(f.locate()).read_text()
            assert "'kernels':" not in text and '"kernels":' not in text


def test_setup_maps_packages_with_package_dir():
    text = (REPO / "setup.py").read_text()
    assert '"spo_fast.kernels": "kernels"' in text and "find_packages" not in text


def test_package_data_globs_ship_every_toyworld_asset():
    """A non-editable install ships the toy world's weights: setup.py's globs cover every asset file."""
    import ast
    import re

    text = (REPO / "setup.py").read_text()
    globs = ast.literal_eval(re.search(r'"spo_fast\.toyworld": (\[[^\]]*\])', text).group(1))
    root = REPO / "spo_fast" / "toyworld"
    shipped = {p for g in globs for p in root.glob(g) if p.is_file()}
    assets = {p for p in (root / "assets").rglob("*") if p.is_file()}
    assert assets and assets == shipped, sorted(str(p.relative_to(root)) for p in assets - shipped)
