"""The separate critic on its own ranks (issue 12): `RemoteCritic` on the actor's ranks, and
`CriticServer` on the critic's, joined by the job's torch.distributed world (NCCL/gloo), no HTTP.

Protocol (lead ranks only: the actor's global rank 0 ↔ the critic's first rank):
    header  int64 [command, rows, width, float planes]
    payload int64 [2, rows, width] (tokens, labels) + float32 [planes, rows, width]
            (action_mask; for an update also old values and returns)
    reply   values float32 [rows, width] (VALUES) or statistics float64 (STATS)
SAVE / LOAD carry a directory (header [command, bytes, 0, 0] + uint8 path) and are answered
float64 [1 ok | 0 failed]: the actor marks a step `latest` only once the critic has saved it.
Sends are non-blocking, so the critic computes while the actor runs its own log-prob pass or
its policy update; the actor waits only when it needs a result (values before GAE, statistics
for the step's metrics). Inside each role the lead shares what it received with its ranks.

Rows: each actor rank holds its DP shard of the batch; the shards are gathered over the actor's
DP group (the lead sends the whole batch) and the critic spreads the rows over its own DP ranks,
padding with masked copies (action mask 0: no loss, no count), like `rl.rollout.micro_batches`.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_reft.critic import STAT_KEYS, LocalCritic
from megatron_reft.distributed.roles import SplitWorld, role_group

from megatron_reft.reliability import watchdog
from megatron_reft.reliability.errors import JobError, StorageError

VALUES, UPDATE, STATS, STOP, SAVE, LOAD = 1, 2, 3, 4, 5, 6
PHASES = {VALUES: "critic values", UPDATE: "critic update", SAVE: "critic save", LOAD: "critic load"}


class PeerLost(JobError):
    """The other role's lead rank died or stopped answering (message names it): one line,
    exit 3 (docs/reliability.md)."""


def _recv_from(buffer: torch.Tensor, src: int, peer: str) -> None:
    """recv that names the lost peer: a dead rank closes its sockets (gloo fails at once), a hung
    one runs into parallel.timeout_minutes."""
    try:
        dist.recv(buffer, src=src)
    except RuntimeError as err:
        raise PeerLost(f"{peer} lead rank {src} is gone or did not answer ({err}); "
                       "ending this rank") from err



def _lengths_from_actions(action_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) of rows whose actions are `action_mask`'s ones: the
    first action is at position prompt_length - 1 (reft.md §4's action span)."""
    prompts, responses = [], []
    for row in action_mask:
        actions = row.nonzero().flatten()
        prompts.append(int(actions[0]) + 1 if len(actions) else 1)
        responses.append(len(actions))
    return prompts, responses

def _isend_to(tensor: torch.Tensor, dst: int):
    try:
        return dist.isend(tensor, dst)
    except RuntimeError as err:
        raise PeerLost(f"critic lead rank {dst} is gone or did not answer ({err}); "
                       "ending this rank") from err
TIMER_KEYS = ("critic_values_time", "critic_update_time")


def _pad_width(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], width - t.shape[1]) + tuple(t.shape[2:]))], dim=1)


def _gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every DP rank's rows (equal row counts; widths padded to the widest)."""
    width = torch.tensor([local.shape[-1]])
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    local = torch.nn.functional.pad(local, (0, int(width) - local.shape[-1])).contiguous()  # [k, n, w]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=1)


class RemoteCritic:
    """The actor's handle on a critic running on other ranks (same interface as critic.py's)."""
    shared = False

    def __init__(self, split: SplitWorld):
        self.split = split
        self.is_lead = dist.get_rank() == split.actor.first_rank
        self.critic_lead = split.critic.first_rank
        self._sends: list = []
        self.wait_seconds = 0.0

    # ---------------------------------------------------------------- requests
    def _send(self, command: int, microbatches: list[dict], float_keys: tuple[str, ...]) -> None:
        from megatron.core import parallel_state as ps

        width = max(mb["tokens"].shape[1] for mb in microbatches)
        ints = torch.stack([torch.cat([_pad_width(mb[k], width) for mb in microbatches])
                            for k in ("tokens", "labels")])
        floats = torch.stack([torch.cat([_pad_width(mb[k].float(), width) for mb in microbatches])
                              for k in float_keys])
        group = ps.get_data_parallel_group()
        ints, floats = _gather_rows(ints, group), _gather_rows(floats, group)
        if self.is_lead:
            header = torch.tensor([command, ints.shape[1], ints.shape[2], floats.shape[0]])
            for t in (header, ints, floats):  # kept alive until sent (see close())
                self._keep_until_sent(_isend_to(t, self.critic_lead), t)

    def _command(self, command: int) -> None:
        if self.is_lead:
            header = torch.tensor([command, 0, 0, 0])
            self._keep_until_sent(_isend_to(header, self.critic_lead), header)

    def _keep_until_sent(self, handle, tensor: torch.Tensor) -> None:
        """A non-blocking send's tensor must outlive the send; finished ones are let go."""
        self._sends = [(h, t) for h, t in self._sends if not h.is_completed()]
        self._sends.append((handle, tensor))

    def request_values(self, microbatches: list[dict]):
        """Send the batch; the critic's value pass runs while the actor goes on."""
        self._send(VALUES, microbatches, ("action_mask",))
        return _PendingValues(self, microbatches)

    def values(self, microbatches: list[dict], policy_outputs=None) -> list:
        return self.request_values(microbatches).result()

    def update(self, microbatches: list[dict]) -> dict:
        """One critic optimizer step on this mini-batch, running while the actor trains."""
        self._send(UPDATE, microbatches, ("action_mask", "values", "returns"))
        return {}

    def save(self, directory, model_cfg=None, tokenizer=None, carry_from=None) -> None:
        """The critic saves itself into `directory` (same step as the actor); waits for it."""
        self._path_command(SAVE, directory)

    def load(self, directory, load_rng: bool = True) -> None:
        """The critic resumes from `directory` at its own layout; waits for it."""
        self._path_command(LOAD, directory)

    def _path_command(self, command: int, directory) -> None:
        path = torch.tensor(list(str(directory).encode()), dtype=torch.uint8)
        if self.is_lead:
            header = torch.tensor([command, len(path), 0, 0])
            for t in (header, path):
                self._keep_until_sent(_isend_to(t, self.critic_lead), t)
        ok = torch.zeros(1, dtype=torch.float64)
        self._receive(ok)
        if not ok.item():
            what = "save its checkpoint into" if command == SAVE else "resume from"
            raise StorageError(f"the critic (ranks {self.split.critic.ranks}) could not {what} "
                               f"{directory} (its lead rank's log says why)")

    def update_stats(self) -> dict:
        """Wait for the critic's updates; their statistics and the critic's phase timers."""
        self._command(STATS)
        reply = torch.zeros(len(STAT_KEYS) + len(TIMER_KEYS), dtype=torch.float64)
        self._receive(reply)
        names = list(STAT_KEYS)
        stats = dict(zip(names + list(TIMER_KEYS), reply.tolist()))
        stats["critic_wait"], self.wait_seconds = self.wait_seconds, 0.0
        busy = stats["critic_values_time"] + stats["critic_update_time"]
        # Share of the critic's compute hidden behind the actor's work (1: the actor never waited).
        stats["critic_overlap"] = max(0.0, 1.0 - stats["critic_wait"] / busy) if busy > 0 else 0.0
        return stats

    def _receive(self, buffer: torch.Tensor) -> None:
        """Lead receives from the critic lead, then shares with every actor rank."""
        t0 = time.perf_counter()
        if self.is_lead:
            _recv_from(buffer, self.critic_lead, "critic")
        dist.broadcast(buffer, src=self.split.actor.first_rank, group=role_group())
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        self._command(STOP)
        for handle, _ in self._sends:
            handle.wait()
        self._sends = []


class _PendingValues:
    def __init__(self, client: RemoteCritic, microbatches: list[dict]):
        self.client, self.microbatches = client, microbatches

    def result(self, policy_outputs=None) -> list:
        from megatron.core import parallel_state as ps

        mbs = self.microbatches
        local_rows, width = sum(mb["tokens"].shape[0] for mb in mbs), max(mb["tokens"].shape[1] for mb in mbs)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        widest = torch.tensor([width])
        dist.all_reduce(widest, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        values = torch.empty(local_rows * dp, int(widest))
        self.client._receive(values)
        mine = values[dp_rank * local_rows:(dp_rank + 1) * local_rows]
        out, start = [], 0
        for mb in mbs:
            b, s = mb["tokens"].shape
            out.append(mine[start:start + b, :s])
            start += b
        return out


class CriticServer:
    """Runs on the critic's ranks: answers value requests and trains on update requests until
    the actor says STOP."""

    def __init__(self, critic: LocalCritic, split: SplitWorld, micro_batch_size: int, saving=None):
        self.critic, self.split, self.micro_batch_size = critic, split, micro_batch_size
        self.is_lead = dist.get_rank() == split.critic.first_rank
        self.actor_lead = split.actor.first_rank
        # what a critic checkpoint carries besides weights: model_cfg, tokenizer, carry_from
        self.saving = saving or {}

    def _from_actor(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.is_lead:
            _recv_from(buffer, self.actor_lead, "actor")
        dist.broadcast(buffer, src=self.split.critic.first_rank, group=role_group())
        return buffer

    def serve(self) -> None:
        while True:
            # Waiting for the actor (its generation, scoring, ...) is not a hang of ours; a dead
            # actor lead fails the receive, a hung one is ended by its own watchdog.
            watchdog.enter(watchdog.IDLE)
            command, rows, width, planes = self._from_actor(torch.zeros(4, dtype=torch.long)).tolist()
            watchdog.enter(PHASES.get(command, "critic"))
            if command == STOP:
                return
            if command == STATS:
                self._reply_stats()
                continue
            if command in (SAVE, LOAD):
                path = bytes(self._from_actor(torch.empty(rows, dtype=torch.uint8)).tolist()).decode()
                self._reply_done(self._save_or_load(command, path))
                continue
            ints = self._from_actor(torch.empty(2, rows, width, dtype=torch.long))
            floats = self._from_actor(torch.empty(planes, rows, width))
            microbatches = self._my_microbatches(ints, floats)
            if command == VALUES:
                self._reply_values(self.critic.values(microbatches), rows)
            else:
                self.critic.update(microbatches)

    def _my_microbatches(self, ints: torch.Tensor, floats: torch.Tensor) -> list[dict]:
        """This critic DP rank's share of the rows, as equal micro-batches (masked padding)."""
        from megatron.core import parallel_state as ps

        from megatron_reft.rl.rollout import RolloutBatch, split_rows

        keys = ("action_mask", "values", "returns")[:floats.shape[0]]
        action_mask = floats[0]
        batch = RolloutBatch(ints[0], ints[1], action_mask, *_lengths_from_actions(action_mask), [],
                             tensors={k: floats[i] for i, k in enumerate(keys) if k != "action_mask"})
        rows = ints.shape[1]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        share = -(-rows // dp)
        mine = list(range(dp_rank * share, min(rows, (dp_rank + 1) * share)))
        mine += [-1] * (share - len(mine))  # short last share: padded below
        # rows in order and at full width, so that the reply is a plain concatenation
        in_order = [r if r >= 0 else 0 for r in mine]
        mbs = [split_rows(batch, in_order[i:i + self.micro_batch_size])
               for i in range(0, len(in_order), self.micro_batch_size)]
        padded = [i for i, r in enumerate(mine) if r < 0]
        for i in padded:  # a padding row must add nothing to any loss
            mbs[i // self.micro_batch_size]["action_mask"][i % self.micro_batch_size] = 0.0
        self._share = share
        return mbs

    def _reply_values(self, values: list[torch.Tensor], rows: int) -> None:
        from megatron.core import parallel_state as ps

        mine = torch.cat(values)[:self._share].contiguous()
        group = ps.get_data_parallel_group()
        parts = [torch.empty_like(mine) for _ in range(ps.get_data_parallel_world_size())]
        dist.all_gather(parts, mine, group=group)
        if self.is_lead:
            dist.send(torch.cat(parts)[:rows].float().contiguous(), self.actor_lead)

    def _save_or_load(self, command: int, path: str) -> bool:
        try:
            if command == SAVE:
                self.critic.save(path, **self.saving)
            else:
                self.critic.load(path, load_rng=True)  # the critic's ranks keep their own RNG
            return True
        except (JobError, OSError, RuntimeError) as err:  # reported by the actor, named here
            if self.is_lead:
                print(f"error: critic rank {dist.get_rank()}: {' '.join(str(err).split())[:400]}",
                      flush=True)
            return False

    def _reply_done(self, ok: bool) -> None:
        flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=role_group())  # every critic rank
        if self.is_lead:
            dist.send(flag, self.actor_lead)

    def _reply_stats(self) -> None:
        stats = self.critic.update_stats()
        names = list(STAT_KEYS)
        reply = torch.tensor([stats[k] for k in names + list(TIMER_KEYS)], dtype=torch.float64)
        if self.is_lead:
            dist.send(reply, self.actor_lead)


def run_critic_role(config) -> None:
    """`megatron-reft ppo` on a critic rank of a split world: build the critic, serve the actor
    until it closes the critic (the actor's trainer drives saving and resuming)."""
    from megatron_reft import runtime
    from megatron_reft.engines import build_critic

    # Same start-up as the actor's (rank 0 may train the synthetic tokenizer: a world barrier).
    data = runtime.load_data(config, need_train=False)
    model_cfg = runtime.model_config_for(config, data)
    server = build_critic(config, model_cfg)
    server.saving = dict(model_cfg=model_cfg, tokenizer=data.tokenizer,
                         carry_from=config.critic.load or config.model.load)
    server.serve()
