"""Batching whose position can be saved and restored exactly, and SFT collation.

ResumableBatchSampler walks a per-epoch seeded permutation of the dataset in global batches and
hands each data-parallel rank its contiguous slice of every global batch. Its state is just
(epoch, global batches consumed in that epoch): the order of an epoch depends only on
(seed, epoch), so a restored sampler yields exactly the batches the saved one would have, even
under a different data-parallel size (the global batch is the unit, not the rank's slice).
"""
import torch


class ResumableBatchSampler:
    """Yields this rank's indices of each global batch; one `for` loop = (the rest of) one epoch.

    drop_last=True (the default) drops the final incomplete global batch of an epoch, so every
    step sees a full, equally split batch; those few items are still seen in later epochs
    because the permutation changes. drop_last=False instead completes the last global batch by
    wrapping around to the start of the same epoch's permutation (a few items are seen twice).
    """

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if num_samples < (global_batch_size if drop_last else 1):
            from megatron_reft.config.load import ConfigError  # a ValueError; the CLI exits 2 on it

            raise ConfigError(f"data.train_file: {num_samples} usable samples cannot fill one global batch of "
                              f"{global_batch_size} (too few records, or too many longer than "
                              "data.max_length / data.max_prompt_length)")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.position = 0, 0  # position: global batches already handed out this epoch
        self._cached_order = (None, [])

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's permutation; a function of (seed, epoch) only, which is what makes resuming exact."""
        if not self.shuffle:
            return list(range(self.num_samples))
        if self._cached_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_order = (epoch, torch.randperm(self.num_samples, generator=generator).tolist())
        return self._cached_order[1]

    def global_batch(self, epoch: int, batch_index: int) -> list[int]:
        """All ranks' indices of one global batch (for logging, or to check what a rank will see)."""
        order = self.epoch_order(epoch)
        start = batch_index * self.global_batch_size
        batch = order[start:start + self.global_batch_size]
        if len(batch) < self.global_batch_size:  # only with drop_last=False: wrap around
            batch += order[:self.global_batch_size - len(batch)]
        return batch

    def next_batch(self) -> list[int]:
        """This rank's next batch from an endless stream across epochs (for loops that count steps)."""
        if self.position >= self.batches_per_epoch:  # the epoch has ended: start the next
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.global_batch(self.epoch, self.position)
        self.position += 1
        return batch[self.dp_rank * self.local_batch_size:(self.dp_rank + 1) * self.local_batch_size]

    def __iter__(self):
        """The rest of the current epoch (or the whole next one if the current one has ended)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and position; the dataset and batch definition must be the same (dp_size may differ)."""
        for key in ("seed", "num_samples", "global_batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                                 "resuming would not reproduce the saved data order")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_shard(num_samples: int, dp_rank: int, dp_size: int) -> list[int]:
    """Every item exactly once across ranks, in a strided split (for evaluation, not training)."""
    return list(range(dp_rank, num_samples, dp_size))


def collate_sft(examples, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch: tokens[t] predicts labels[t] = input_ids[t + 1].

    Megatron's GPTModel takes (tokens, labels) already shifted like this. loss_mask[t] is the mask
    of the predicted token (so position t is trained iff input_ids[t + 1] is a target or EOS);
    padding has loss_mask 0 and label pad_id. All three are LongTensors of shape [batch, length],
    where length = longest example - 1, rounded up to pad_to_multiple_of (e.g. for sequence
    parallelism).
    """
    length = max(len(example.input_ids) for example in examples) - 1
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        n = len(ids) - 1
        tokens[row, :n] = ids[:-1]
        labels[row, :n] = ids[1:]
        loss_mask[row, :n] = torch.tensor(example.loss_mask[1:], dtype=torch.long)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def plan_micro_batches(lengths: list[int], micro_batch_size: int, token_budget: int | None = None,
                       width_multiple: int = 1, max_width: int | None = None) -> list[list[int]]:
    """Rows grouped into micro-batches that are trimmed to their own longest sequence.

    Rows are sorted by length (longest first, ties by index, so the plan is deterministic), then
    cut into groups: of `micro_batch_size` rows, or — with `token_budget` — as many rows as fit
    while rows × (longest row, rounded up to `width_multiple`, at most `max_width`) stays within
    the budget. A single
    row longer than the budget forms a micro-batch of its own (the only way a micro-batch can
    exceed the budget). Sorting keeps similar lengths together, so trimming leaves little padding.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for row in order:
        if groups and _fits(groups[-1], lengths, micro_batch_size, token_budget, width_multiple, max_width):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _fits(group: list[int], lengths: list[int], micro_batch_size: int, token_budget: int | None,
          width_multiple: int, max_width: int | None) -> bool:
    """Can one more (no longer) row join `group`? Its width is set by its first, longest row."""
    if token_budget is None:
        return len(group) < micro_batch_size
    return (len(group) + 1) * group_width(lengths, group[:1], width_multiple, max_width) <= token_budget


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padding_fraction(lengths: list[int], groups: list[list[int]], width_multiple: int = 1,
                     cap: int | None = None) -> float:
    """Share of the computed positions that are padding when each group is trimmed to its longest."""
    computed = sum(len(g) * group_width(lengths, g, width_multiple, cap) for g in groups)
    return 1.0 - sum(lengths) / computed if computed else 0.0


def group_width(lengths: list[int], group: list[int], width_multiple: int = 1, cap: int | None = None) -> int:
    width = round_up(max(lengths[i] for i in group), width_multiple)
    return min(width, cap) if cap is not None else width
