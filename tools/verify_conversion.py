#!/usr/bin/env python
"""compare a Hugging Face model and a converted checkpoint (logits, greedy).

Same as `megatron-reft convert verify ...`; see docs/conversion.md.
"""
import sys

from megatron_reft.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify"] + sys.argv[1:]))
