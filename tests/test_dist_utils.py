"""tests/dist_utils.run_distributed: results, error propagation, timeouts."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed


def _sum_ranks(rank, world_size, scale):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return {"rank": rank, "env_rank": int(os.environ["RANK"]), "sum": x.item() * scale}


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        assert rank == 0, "rank 1 disagrees"
    dist.barrier()  # rank 0 waits here forever; the runner must not


def _raise(rank, world_size):
    raise ValueError(f"boom on {rank}")


def _sleep(rank, world_size):
    time.sleep(60)


def test_results_in_rank_order():
    results = run_distributed(_sum_ranks, 3, 2.0, timeout_s=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["env_rank"] for r in results] == [0, 1, 2]
    assert all(r["sum"] == 6.0 for r in results)


def test_child_assertion_fails_the_test():
    with pytest.raises(AssertionError, match="rank 1 disagrees"):
        run_distributed(_fail_on_rank_1, 2, timeout_s=60)


def test_child_exception_becomes_runtime_error():
    with pytest.raises(RuntimeError, match="ValueError: boom"):
        run_distributed(_raise, 2, timeout_s=60, init_process_group=False)


def test_timeout():
    with pytest.raises(TimeoutError, match="did not finish within"):
        run_distributed(_sleep, 2, timeout_s=4, init_process_group=False)
