"""ResumableBatchSampler (exact resume, DP sharding, drop_last) and collate_sft (shift and masks)."""
import itertools

import pytest
import torch

from megatron_reft.data.batching import ResumableBatchSampler, collate_sft, eval_shard
from megatron_reft.data.prompts import SFTExample


def take(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def test_resume_after_k_batches_gives_identical_next_batches():
    sampler = ResumableBatchSampler(num_samples=50, global_batch_size=8, dp_rank=1, dp_size=2, seed=3)
    take(sampler, 9)  # crosses the epoch boundary (6 batches per epoch with drop_last)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    expected = take(sampler, 10)
    restored = ResumableBatchSampler(num_samples=50, global_batch_size=8, dp_rank=1, dp_size=2, seed=3)
    restored.load_state_dict(state)
    assert take(restored, 10) == expected


def test_resume_mid_epoch_with_for_loop():
    sampler = ResumableBatchSampler(num_samples=40, global_batch_size=4, seed=0)
    full_epoch = list(ResumableBatchSampler(num_samples=40, global_batch_size=4, seed=0))
    seen = list(itertools.islice(iter(sampler), 4))
    restored = ResumableBatchSampler(num_samples=40, global_batch_size=4, seed=0)
    restored.load_state_dict(sampler.state_dict())
    assert seen + list(restored) == full_epoch  # the loop finishes exactly the interrupted epoch
    assert restored.state_dict()["position"] == len(restored) == 10
    next_epoch = list(restored)  # a saved, finished epoch resumes at the next one
    assert restored.epoch == 1 and sorted(sum(next_epoch, [])) == list(range(40)) and next_epoch != full_epoch


def test_dp_ranks_split_each_global_batch():
    ranks = [ResumableBatchSampler(num_samples=30, global_batch_size=6, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    reference = ResumableBatchSampler(num_samples=30, global_batch_size=6, seed=1)
    for step in range(12):
        parts = [s.next_batch() for s in ranks]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == reference.global_batch(step // 5, step % 5)
    # Resuming under a different data-parallel size continues the same global stream.
    state = ranks[0].state_dict()
    single = ResumableBatchSampler(num_samples=30, global_batch_size=6, seed=1)
    single.load_state_dict(state)
    assert single.next_batch() == reference.global_batch(2, 2)


def test_epochs_are_permutations_and_differ():
    sampler = ResumableBatchSampler(num_samples=12, global_batch_size=4, seed=0)
    epochs = [sum(list(sampler), []) for _ in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    plain = ResumableBatchSampler(num_samples=12, global_batch_size=4, shuffle=False)
    assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_drop_last_and_wrap_around():
    dropping = ResumableBatchSampler(num_samples=10, global_batch_size=4, shuffle=False)
    assert list(dropping) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    wrapping = ResumableBatchSampler(num_samples=10, global_batch_size=4, shuffle=False, drop_last=False)
    assert list(wrapping) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_bad_configurations_and_mismatched_state():
    with pytest.raises(ValueError, match="divisible"):
        ResumableBatchSampler(num_samples=10, global_batch_size=5, dp_size=2)
    with pytest.raises(ValueError, match="cannot fill"):
        ResumableBatchSampler(num_samples=3, global_batch_size=4)
    state = ResumableBatchSampler(num_samples=10, global_batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ResumableBatchSampler(num_samples=10, global_batch_size=2, seed=2).load_state_dict(state)


def test_eval_shard_covers_everything_once():
    shards = [eval_shard(11, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_collate_sft_shift_and_masks():
    examples = [SFTExample([10, 11, 12, 13, 2], [0, 0, 1, 1, 1]), SFTExample([20, 21, 2], [0, 1, 1])]
    batch = collate_sft(examples, pad_id=0)
    assert batch["tokens"].tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert batch["labels"].tolist() == [[11, 12, 13, 2], [21, 2, 0, 0]]
    # Position t is trained iff its label (token t+1) is a target token or EOS.
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = collate_sft(examples, pad_id=0, pad_to_multiple_of=8)
    assert padded["tokens"].shape == (2, 8) and padded["loss_mask"][:, 4:].sum() == 0
