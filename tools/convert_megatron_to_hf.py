#!/usr/bin/env python
"""megatron-reft checkpoint (any TP x PP) -> Hugging Face directory.

Same as `megatron-reft convert megatron-to-hf ...`; see docs/conversion.md.
"""
import sys

from megatron_reft.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main(["megatron-to-hf"] + sys.argv[1:]))
