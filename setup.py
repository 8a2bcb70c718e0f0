"""Build script: installs one import package, ``spo_fast`` (with its sub-packages and data).

Nothing else in the repository is importable: Python puts the working directory first on ``sys.path``, so a
root folder that is a package (it was ``kernels/``) shadows an installed distribution of the same name
(Hugging Face's ``kernels``, which transformers requires). ``tests/test_package.py`` enforces it. The recipes
and architecture files are package data in ``spo_fast/configs/`` (not a package); the root ``configs`` is a link
to it, so users find them where they look.

Install through the known-good versions: ``pip install -c constraints.txt -e ".[dev]"`` (see README.md).
"""
from setuptools import find_packages, setup

setup(
    name="spo_fast",
    version="0.1.0",
    description="Step-aware Preference Optimization (SPO) and Diffusion-DPO for Stable Diffusion, fast.",
    python_requires=">=3.10",
    packages=find_packages(include=["spo_fast", "spo_fast.*"]),
    package_data={
        # configs/<recipe>.yaml, configs/arch/<pipeline>/<component>/<file> and arch/<preference model>/<file>
        "spo_fast": ["configs/*.yaml", "configs/arch/*.txt", "configs/arch/*/*", "configs/arch/*/*/*"],
        # the toy world's trained weights and preference pairs (python -m spo_fast.toyworld build)
        "spo_fast.toyworld": ["assets/*.json", "assets/*.parquet", "assets/*/*", "assets/*/*/*"],
    },
    include_package_data=True,
    install_requires=[
        # Ranges, not pins: the GPU image has torch 2.11 + triton 3.6, the CPU machines torch 2.13 (local CPU
        # wheel) + triton 3.7. Install torch *first* on CPU machines (`pip install torch==2.13.0`) so nothing here
        # pulls the CUDA build. The exact versions the suite last passed with are in constraints.txt.
        "torch>=2.4",
        "diffusers>=0.31",
        "transformers>=4.44",
        "accelerate>=0.34",
        "peft>=0.13",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "pyarrow>=14",  # preference pairs as parquet (the Pick-a-Pic schema)
        "matplotlib>=3.7",  # compare.png (python -m spo_fast.compare); Agg backend, no display needed
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "ruff>=0.5",
            "tensorboard>=2.14",  # the trackers the tests log to (log.report_to); wandb runs offline there
            "wandb>=0.17",
            # torch 2.13's own pin is triton 3.7; 3.6 is what the GPU image carries.
            "triton>=3.6,<3.8; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.17"],
        "xformers": ["xformers"],
        "flash-attn": ["flash-attn"],
    },
    entry_points={"console_scripts": ["spo-fast-train=spo_fast.train:main",
                                      "spo-fast-train-spm=spo_fast.train_spm:main",
                                      "spo-fast-evaluate=spo_fast.evaluate:main"]},
)
