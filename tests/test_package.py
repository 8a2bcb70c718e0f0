"""Packaging: one import package, ``spo_fast``; no root folder shadows an installed distribution.

Python puts the working directory first on ``sys.path``, so a root folder that is a package (or a module file) is
found before any installed distribution of the same name. A root ``kernels/`` once shadowed Hugging Face's
``kernels``, which transformers requires: every command run from the repository root failed.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import spo_fast
from spo_fast.core.config import configs_dir

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = "setup"  # setup.py: run by pip, never imported


def root_import_names(repo: Path) -> dict[str, str]:
    """{name: kind} of what ``import name`` could find in ``repo`` itself: ``package`` (a folder with
    ``__init__.py``), ``module`` (a ``.py``/extension file), ``namespace`` (any other folder with an identifier's
    name: importable as a namespace package, which an installed package of that name still wins over)."""
    found = {}
    for p in repo.iterdir():
        name = p.name.split(".")[0]
        if p.name.startswith((".", "_")) or not name.isidentifier():
            continue
        if p.is_dir():
            found[name] = "package" if (p / "__init__.py").is_file() else "namespace"
        elif p.suffix in (".py", ".so", ".pyd"):
            found[name] = "module"
    return found


def test_only_spo_fast_is_a_package_at_the_root():
    shadowing = {n: k for n, k in root_import_names(REPO).items()
                 if k != "namespace" and n not in ("spo_fast", BUILD_SCRIPT)}
    assert not shadowing, (f"root entries importable before any installed distribution: {shadowing}; "
                           "move them inside spo_fast/ (or drop their __init__.py if they are data)")


def test_dependencies_import_from_the_root():
    """From the root, every installed distribution's top-level name that is also a root entry's name
    (``kernels`` was) resolves outside the repository, and diffusers' VAE module, which imports Hugging Face's
    ``kernels`` through transformers and peft, imports."""
    names = sorted(n for n in root_import_names(REPO) if n in importlib.metadata.packages_distributions()
                   and n != "spo_fast")
    code = ("import importlib.util, sys\n"
            "import diffusers.models.autoencoders.autoencoder_kl\n"
            f"for n in {names!r}:\n"
            "    spec = importlib.util.find_spec(n)\n"
            "    origins = list(spec.submodule_search_locations or []) + [spec.origin or '']\n"
            f"    assert not any(o.startswith({str(REPO)!r}) for o in origins), (n, origins)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_installed_distribution_has_one_top_level_package():
    dist = importlib.metadata.distribution("spo_fast")
    assert dist.read_text("top_level.txt").split() == ["spo_fast"]
    for f in dist.files or []:
        if str(f).endswith("_finder.py"):  # editable install: its name -> path mapping
            text = Path(f.locate()).read_text()
            assert "'kernels':" not in text and '"kernels":' not in text


def test_recipes_are_package_data_and_the_root_configs_links_to_them():
    assert configs_dir() == Path(spo_fast.__file__).parent / "configs"
    assert (configs_dir() / "toy_spo.yaml").is_file() and not (configs_dir() / "__init__.py").exists()
    assert (REPO / "configs").resolve() == configs_dir().resolve()


def _shipped(package_dir: Path, key: str) -> set[Path]:
    import ast
    import re

    text = (REPO / "setup.py").read_text()
    globs = ast.literal_eval(re.search(rf'"{re.escape(key)}": (\[[^\]]*\])', text).group(1))
    return {p for g in globs for p in package_dir.glob(g) if p.is_file()}


def test_package_data_globs_ship_every_toyworld_asset_and_config():
    """A non-editable install ships the toy world's weights and every recipe/architecture file."""
    root = REPO / "spo_fast" / "toyworld"
    assets = {p for p in (root / "assets").rglob("*") if p.is_file()}
    assert assets and assets == _shipped(root, "spo_fast.toyworld"), sorted(map(str, assets))
    configs = {p for p in (REPO / "spo_fast" / "configs").rglob("*") if p.is_file()}
    assert configs and configs == _shipped(REPO / "spo_fast", "spo_fast"), sorted(map(str, configs))
