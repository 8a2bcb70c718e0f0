"""Build script: installs the import packages ``spo_fast``, ``spo_fast.kernels`` and
``spo_fast.configs``.

``kernels/`` and ``configs/`` live at the top of the repository but are installed *inside*
``spo_fast`` through ``package_dir``: a top-level ``kernels`` module would shadow the
Hugging Face ``kernels`` package that diffusers and transformers probe for.
"""
import platform

from setuptools import setup

TRITON_OK = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

setup(
    name="spo_fast",
    version="0.1.0",
    description="Step-aware Preference Optimization (SPO) and Diffusion-DPO for Stable Diffusion, fast.",
    python_requires=">=3.10",
    packages=["spo_fast", "spo_fast.data", "spo_fast.kernels", "spo_fast.configs", "spo_fast.toyworld"],
    package_dir={"spo_fast": "spo_fast", "spo_fast.kernels": "kernels", "spo_fast.configs": "configs"},
    package_data={
        # arch/<pipeline>/<component>/<file> and arch/<preference model>/<file>
        "spo_fast.configs": ["*.yaml", "*.txt", "arch/*.txt", "arch/*/*", "arch/*/*/*"],
        # the toy world's trained weights and preference pairs (python -m spo_fast.toyworld build)
        "spo_fast.toyworld": ["assets/*.json", "assets/*.parquet", "assets/*/*", "assets/*/*/*"],
    },
    include_package_data=True,
    install_requires=[
        # Loose on purpose: the GPU image has torch 2.11 + triton 3.6, the CPU machines
        # torch 2.13 (local CPU wheel) + triton 3.7. Install torch *first* on CPU machines
        # (`pip install torch==2.13.0`) so nothing here pulls the CUDA build.
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
            # torch 2.13's own pin is triton 3.7; 3.6 is what the GPU image carries.
            "triton>=3.6,<3.8; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        "tensorboard": ["tensorboard>=2.14"],
        "xformers": ["xformers"],
        "flash-attn": ["flash-attn"],
    },
    entry_points={"console_scripts": ["spo-fast-train=spo_fast.train:main",
                                      "spo-fast-train-spm=spo_fast.train_spm:main",
                                      "spo-fast-evaluate=spo_fast.evaluate:main"]},
)
