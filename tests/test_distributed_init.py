"""Start-up: launch-environment detection (torchrun / Slurm / single), Slurm node lists, and the
CPU compatibility layer for megatron-core (active without CUDA, a no-op with it)."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from megatron_reft.distributed.init import LaunchEnv, detect_launch_env, expand_slurm_nodelist



@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_child():
    """Spawned ranks inherit this; they also call torch.set_num_threads(1) themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


# ---------------------------------------------------------------- Slurm node lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[001-003,007],cpu1", ["gpu001", "gpu002", "gpu003", "gpu007", "cpu1"]),
    ("node7", ["node7"]),
    ("a,b,c", ["a", "b", "c"]),
    ("a[1-2],b[08-10]", ["a1", "a2", "b08", "b09", "b10"]),
    ("rack1-n[9-11]", ["rack1-n9", "rack1-n10", "rack1-n11"]),
    ("x[1,3]-ib,y", ["x1-ib", "x3-ib", "y"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


# ---------------------------------------------------------------- launch detection
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[001-003,007],cpu1", "SLURM_JOB_ID": "12345"}
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "29511"}


def test_slurm_environment():
    # rank/world/local rank from Slurm; master = first node; port derived from the job id so that
    # every rank agrees without talking first
    assert detect_launch_env(dict(SLURM)) == LaunchEnv(3, 8, 1, "gpu001", 20000 + 12345 % 20000, "slurm")


def test_slurm_master_overrides_and_nodelist_fallback():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    env.update(SLURM_NODELIST="cn[07-08]", MASTER_PORT="30001")
    launch = detect_launch_env(env)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("cn07", 30001, "slurm")
    env["MASTER_ADDR"] = "head"
    assert detect_launch_env(env).master_addr == "head"


def test_slurm_job_id_port_stays_in_range():
    launch = detect_launch_env({**SLURM, "SLURM_JOB_ID": "987654321"})
    assert launch.master_port == 20000 + 987654321 % 20000
    assert 20000 <= launch.master_port < 40000


def test_torchrun_variables_win_over_slurm():
    # `srun torchrun ...`: Slurm variables are present, but torchrun's describe this process
    assert detect_launch_env({**SLURM, **TORCHRUN}) == LaunchEnv(1, 2, 1, "10.0.0.5", 29511, "torchrun")


def test_torchrun_defaults():
    launch = detect_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert launch == LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "torchrun")


def test_single_process_without_launcher():
    launch = detect_launch_env({})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.launcher) == \
        (0, 1, 0, "127.0.0.1", "single")
    assert 0 < launch.master_port < 65536
    # half a Slurm environment (e.g. salloc without srun) is not a Slurm launch
    assert detect_launch_env({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0"}).launcher == "single"


# ---------------------------------------------------------------- CPU compatibility layer
def _compat_on_cpu(rank, world_size):
    """Runs in a fresh process: install() patches torch process-wide."""
    torch.set_num_threads(1)
    from megatron_reft.distributed import cpu_compat
    from megatron_reft.distributed import init as dist_init

    assert not cpu_compat.is_active()
    assert cpu_compat.install() is True and cpu_compat.is_active()
    assert cpu_compat.install() is True  # idempotent

    # explicit CUDA devices in factories and moves resolve to the CPU
    for device in ("cuda", "cuda:0", torch.device("cuda", 0), 0, torch.cuda.current_device()):
        assert torch.zeros(2, device=device).device.type == "cpu", device
    assert torch.arange(3, device="cuda").tolist() == [0, 1, 2]
    assert torch.empty(2, device="cuda", pin_memory=True).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda().device.type == "cpu" and x.pin_memory() is x
    assert x.to("cuda").device.type == "cpu" and x.to(0).device.type == "cpu"
    assert x.to(device="cuda", non_blocking=True).device.type == "cpu"
    assert x.to(torch.float64).dtype == torch.float64  # non-device .to() untouched
    assert x.to("cpu", torch.float16).dtype == torch.float16
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
    # megatron's optimizer asserts CUDA type names
    assert x.type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.device_count() == 0 and torch.cuda.memory_allocated() == 0

    # the CUDA RNG maps to the CPU generator
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), a)
    state = torch.cuda.get_rng_state()
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), b)

    # megatron's RNG tracker works: model_parallel_cuda_manual_seed (inside initialize) + fork()
    launch = dist_init.initialize(1, 1, seed=11)
    assert launch.launcher == "torchrun" and dist_init.device() == torch.device("cpu")
    from megatron.core import tensor_parallel

    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # fork() restores the default stream
    dist_init.initialize(1, 1, seed=11)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), forked)  # same seed, same stream

    # a layout that does not fit the world is refused
    with pytest.raises(ValueError, match="not divisible"):
        dist_init.initialize(2, 1, seed=11)
    dist_init.shutdown()
    return True


def _compat_on_gpu(rank, world_size):
    from megatron_reft.distributed import cpu_compat

    zeros, to, type_ = torch.zeros, torch.Tensor.to, torch.Tensor.type
    assert cpu_compat.install() is False and not cpu_compat.is_active()
    assert torch.zeros is zeros and torch.Tensor.to is to and torch.Tensor.type is type_
    assert torch.zeros(1, device="cuda").device.type == "cuda"
    assert torch.ones(1).type() == "torch.FloatTensor"
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour (this machine has CUDA)")
def test_cpu_compat_active_without_cuda():
    assert run_distributed(_compat_on_cpu, 1, init_process_group=False, timeout_s=120) == [True]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: checks that install() leaves megatron-core untouched there")
def test_cpu_compat_inactive_with_cuda():
    assert run_distributed(_compat_on_gpu, 1, init_process_group=False, timeout_s=120) == [True]
