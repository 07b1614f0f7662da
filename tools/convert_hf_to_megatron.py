#!/usr/bin/env python
"""Hugging Face directory -> megatron-reft checkpoint (any TP x PP).

Same as `megatron-reft convert hf-to-megatron ...`; see docs/conversion.md.
"""
import sys

from megatron_reft.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main(["hf-to-megatron"] + sys.argv[1:]))
