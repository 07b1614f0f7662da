"""The reranker's reward model (reft.md §6): a correct/incorrect classifier on the megatron-core
trunk. Hand-checked loss on fixed logits; training on a tiny separable set lifts held-out accuracy
from chance to (nearly) perfect."""
from __future__ import annotations

import math

import pytest
import torch

from dist_utils import run_distributed
from megatron_reft.evaluation.reward_model import classifier_batch, classifier_loss, correct_logits


def test_head_reads_the_final_token_and_loss_is_two_class_ce():
    batch = classifier_batch([[5, 6], [5, 6, 7]], [[8, 2], [9]], [1.0, 0.0], pad_id=0)
    # row 0: prompt 2 + response 2 (+pad) → the final token (EOS 2) is fed at position 3
    last = batch.tensors["last"]
    assert last[0].nonzero().flatten().tolist() == [3] and batch.tokens[0, 3] == 2
    assert last[1].nonzero().flatten().tolist() == [3] and batch.tokens[1, 3] == 9
    values = torch.zeros_like(last)
    values[0, 3], values[1, 3] = 2.0, 0.5
    values[0, 0] = 100.0  # anything elsewhere is ignored
    assert correct_logits(values, last).tolist() == [2.0, 0.5]
    loss, count, stats = classifier_loss(values, last, batch.tensors["is_correct"])
    # −log σ(2) − log(1 − σ(0.5)) = log(1 + e^−2) + log(1 + e^0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)) + math.log1p(math.exp(0.5)))
    assert count.item() == 2 and stats["rm_hits"].item() == 1  # row 1 predicted correct, is not


def _separable(n: int, seed: int):
    """Random prompts and responses; a response is 'correct' iff its last token before EOS is 10."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(20, 200, (int(torch.randint(3, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    labels = [float(i % 2) for i in range(n)]
    responses = [torch.randint(20, 200, (4,), generator=g).tolist() + [10 if y else 11, 2] for y in labels]
    return prompts, responses, labels


def _train_worker(rank, world):
    torch.set_num_threads(1)
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.evaluation.reward_model import p_correct, rm_loss_fn
    from megatron_reft.models.families import model_config_from_preset
    from megatron_reft.rl.rollout import micro_batches

    initialize(1, 1, seed=3)
    engine = Engine(model_config_from_preset("tiny-llama", vocab_size=200), with_value_head=True,
                    optim=OptimSettings(lr=3e-3))
    engine.init_from_scratch(5)
    test_prompts, test_responses, test_labels = _separable(32, seed=2)

    def accuracy():
        p = p_correct(engine, test_prompts, test_responses, pad_id=0)
        return sum((q > 0.5) == bool(y) for q, y in zip(p, test_labels)) / len(p)

    before = accuracy()
    prompts, responses, labels = _separable(64, seed=1)
    batch = classifier_batch(prompts, responses, labels, pad_id=0)
    engine.module.train()
    for epoch in range(6):
        for start in range(0, 64, 16):
            engine.train_step(micro_batches(batch, list(range(start, start + 16)), 8), rm_loss_fn)
    after = accuracy()
    shutdown()
    return before, after


def test_training_lifts_accuracy_above_chance_on_a_separable_set():
    before, after = run_distributed(_train_worker, 1, init_process_group=False, timeout_s=300)[0]
    assert before <= 0.75, before  # an untrained head is near chance (16/32)
    assert after >= 0.9, (before, after)
