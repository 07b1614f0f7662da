"""megatron-reft: ReFT (Reinforced Fine-Tuning) on megatron-core."""

__version__ = "0.1.0"  # setup.py reads it from here
