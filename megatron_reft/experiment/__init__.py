"""`megatron-reft experiment`: the paper's Table 1 (greedy accuracy) and Table 2 (voting and
reranking) from run directories, optionally running the missing jobs first (docs/experiment.md)."""
