"""Split one torch.distributed world into roles (actor, critic), each with its own megatron layout.

megatron-core's parallel state is a process-global singleton built by `initialize_model_parallel`
over *all* ranks of the default group. A separate critic (issue 12) needs each process to hold
the groups of its own role only: actor ranks 0..A-1 with the actor's TP × PP × DP, critic ranks
A..W-1 with the critic's. We get that from megatron itself, unmodified, by running
`initialize_model_parallel` on every process for its own role with three things narrowed for the
duration of the call:

- `torch.distributed.get_world_size()` (no group) answers the role's size, so megatron derives
  the role's DP size and checks divisibility against it;
- `RankGenerator` gets the role's first global rank as `rank_offset` (a parameter megatron has
  but does not expose), so every group it builds lists the role's *global* ranks;
- every process builds *both* roles' groups, actor's first, in the same order (torch's
  `new_group` is a call every rank of the world makes), and keeps the parallel state of its own
  role: megatron's module globals are snapshotted after each role's build and this process's
  role's snapshot is put back. (Local-synchronised group creation, which would spare the
  non-members, hung in gloo's rendezvous on CPU.)

Everything else in megatron then works as usual inside a role: its collectives run on its own
groups, and `get_pipeline_model_parallel_last_rank()` etc. return global ranks. Collectives on the
default group (`dist.all_reduce(x)` without a group) span both roles and must not be used by
role code; `role_group()` is the role's replacement for "the world".
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Role:
    name: str  # "actor" or "critic"
    first_rank: int  # global rank of the role's rank 0 (its lead rank)
    size: int
    tensor_parallel: int
    pipeline_parallel: int

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.size))

    @property
    def data_parallel(self) -> int:
        return self.size // (self.tensor_parallel * self.pipeline_parallel)


@dataclass(frozen=True)
class SplitWorld:
    actor: Role
    critic: Role

    def role_of(self, rank: int) -> Role:
        return self.actor if rank < self.critic.first_rank else self.critic


_ROLE: Role | None = None
_ROLE_GROUP = None
_SPLIT: SplitWorld | None = None


def plan_split(world_size: int, critic_world_size: int, actor_tp: int, actor_pp: int,
               critic_tp: int, critic_pp: int) -> SplitWorld:
    """Actor ranks first (rank 0 stays the job's lead: logs, metrics, checkpoints), critic last."""
    actor_size = world_size - critic_world_size
    if critic_world_size < 1 or actor_size < 1:
        raise ValueError(f"critic.world_size={critic_world_size} must leave at least one actor rank "
                         f"and take at least one of the world's {world_size}")
    for name, size, tp, pp in (("actor", actor_size, actor_tp, actor_pp),
                               ("critic", critic_world_size, critic_tp, critic_pp)):
        if size % (tp * pp):
            raise ValueError(f"{name} ranks ({size}) are not a multiple of TP x PP = {tp} x {pp}")
    return SplitWorld(Role("actor", 0, actor_size, actor_tp, actor_pp),
                      Role("critic", actor_size, critic_world_size, critic_tp, critic_pp))


@contextlib.contextmanager
def _megatron_sees_only(role: Role):
    """Narrow megatron's view of the world to `role` while it builds its groups (module doc)."""
    from megatron.core import parallel_state as ps

    real_world_size, real_generator = dist.get_world_size, ps.RankGenerator

    def role_world_size(group=None):
        return role.size if group is None else real_world_size(group)

    class RoleRankGenerator(real_generator):
        def __init__(self, *args, **kwargs):
            kwargs["rank_offset"] = role.first_rank
            super().__init__(*args, **kwargs)

    dist.get_world_size, ps.RankGenerator = role_world_size, RoleRankGenerator
    try:
        yield
    finally:
        dist.get_world_size, ps.RankGenerator = real_world_size, real_generator


def _megatron_globals() -> dict:
    from megatron.core import parallel_state as ps

    return {k: v for k, v in vars(ps).items() if k.startswith("_") and k[1:2].isupper()}


def initialize_role(split: SplitWorld, timeout_minutes: float = 10.0) -> Role:
    """Build this process's role's megatron parallel state (the default group must exist)."""
    from megatron.core import parallel_state as ps

    global _ROLE, _ROLE_GROUP, _SPLIT
    role = split.role_of(dist.get_rank())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    pristine, built = _megatron_globals(), {}
    for r in (split.actor, split.critic):  # the same order on every process (module doc)
        for name, value in pristine.items():
            setattr(ps, name, copy.copy(value))
        with _megatron_sees_only(r):
            ps.initialize_model_parallel(tensor_model_parallel_size=r.tensor_parallel,
                                         pipeline_model_parallel_size=r.pipeline_parallel,
                                         distributed_timeout_minutes=int(max(1, timeout_minutes)))
        built[r.name] = _megatron_globals()
    for name, value in built[role.name].items():
        setattr(ps, name, value)
    # Every process creates both role groups in the same order (plain, world-synchronised).
    groups = {r.name: dist.new_group(r.ranks) for r in (split.actor, split.critic)}
    _ROLE, _ROLE_GROUP, _SPLIT = role, groups[role.name], split
    return role


def current_role() -> Role | None:
    """This process's role; None when the world is not split (shared critic)."""
    return _ROLE


def role_group():
    """The group of this process's role; None (the default group) when the world is not split."""
    return _ROLE_GROUP


def current_split() -> SplitWorld | None:
    return _SPLIT


def clear_role() -> None:
    global _ROLE, _ROLE_GROUP, _SPLIT
    _ROLE, _ROLE_GROUP, _SPLIT = None, None, None


def start_split_world(split_args: dict, seed: int, timeout_minutes: float = 10.0) -> Role:
    """Start torch.distributed (like distributed.init.initialize) and this process's role.
    `split_args`: plan_split's keyword arguments except world_size (see `split_args_of`)."""
    from megatron_reft.distributed.init import seed_model_parallel, start_process_group

    start_process_group(timeout_minutes)
    split = plan_split(dist.get_world_size(), **split_args)
    role = initialize_role(split, timeout_minutes)
    seed_model_parallel(seed)
    return role


def split_args_of(config) -> dict | None:
    """plan_split's arguments for a config whose critic has ranks of its own; None otherwise
    (shared trunk, or a separate critic on the actor's ranks)."""
    c, p = config.critic, config.parallel
    if c.mode != "separate" or not c.world_size:
        return None
    return dict(critic_world_size=c.world_size, actor_tp=p.tensor_model_parallel_size,
                actor_pp=p.pipeline_model_parallel_size, critic_tp=c.tensor_model_parallel_size,
                critic_pp=c.pipeline_model_parallel_size)


def role_rank() -> int:
    """This process's rank inside its role (its global rank when the world is not split)."""
    if not dist.is_initialized():
        return 0
    return dist.get_rank(_ROLE_GROUP) if _ROLE_GROUP is not None else dist.get_rank()


@contextlib.contextmanager
def role_as_world():
    """Let library code that works on torch's default group (megatron's dist_checkpointing,
    torch.distributed.checkpoint: collectives without a group, rank 0 as coordinator) run on
    this role's ranks only, by making the role's group the default for the duration.

    Inside, `dist.get_rank(group)` for any *other* group is wrong on critic ranks (torch maps
    it through the default group's rank), so compute sharded state dicts before entering."""
    from torch.distributed import distributed_c10d as c10d

    if _ROLE_GROUP is None:
        yield
        return
    world = c10d._get_default_group()
    # Inside, the role's ranks are numbered 0..size-1 ("global" ranks of the role's world).
    global_to_role = c10d._world.pg_group_ranks[_ROLE_GROUP]
    c10d._world.pg_group_ranks[_ROLE_GROUP] = {i: i for i in range(len(global_to_role))}
    c10d._update_default_pg(_ROLE_GROUP)
    try:
        yield
    finally:
        c10d._update_default_pg(world)
        c10d._world.pg_group_ranks[_ROLE_GROUP] = global_to_role
