"""megatron-reft: ReFT (Reinforced Fine-Tuning) on megatron-core."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "megatron_reft/__init__.py").read_text())[1]

setup(
    name="megatron-reft",
    version=VERSION,
    description="ReFT (warm-up SFT + PPO with answer rewards) on megatron-core, HF <-> Megatron conversion, Slurm recipes",
    packages=find_packages(include=["megatron_reft", "megatron_reft.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by the README commands (the CPU build here, a CUDA build on clusters);
        # any recent torch satisfies this range, so pip never swaps the user's build.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # dist_checkpointing's writer needs it (without it the save hangs)
        "pyyaml",
        "numpy",
        "transformers>=4.40",
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "datasets",
        "tensorboard",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # NVIDIA apex (fused Adam/LayerNorm) must be built from github.com/NVIDIA/apex;
        # the PyPI package called "apex" is unrelated and must never be installed.
        "gpu": ["transformer_engine[pytorch]"],
        "wandb": ["wandb>=0.17"],  # trainer.wandb_project
        "test": ["pytest", "pytest-timeout", "wandb>=0.17"],
    },
    entry_points={"console_scripts": ["megatron-reft=megatron_reft.cli:main"]},
)
