"""Self-training baselines (reft.md §6): the online loss on a hand-computed batch, and the
offline-ST filter on real SVAMP records (../shared/data/mwp_reft) with scripted samples scored
by the real reward scorer."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_reft.rl.self_training import (correct_sample_mask, offline_self_training_records,
                                            online_self_training_loss, sampled_cot)

NAN = float("nan")


# ---------------------------------------------------------------- online self-training loss
def _batch():
    sample_logprobs = torch.tensor([[-1.0, -2.0, -3.0, NAN],   # correct (reward 1)
                                    [-0.5, -0.5, NAN, NAN],    # wrong but extracted (0.1)
                                    [-4.0, -4.0, -4.0, -4.0]], requires_grad=True)  # correct
    action_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    scores = torch.tensor([1.0, 0.1, 1.0])
    gold_logprobs = torch.tensor([[-1.0, -1.0], [-2.0, NAN]], requires_grad=True)
    gold_mask = torch.tensor([[1, 1], [1, 0]])
    return sample_logprobs, action_mask, scores, gold_logprobs, gold_mask


def test_online_loss_hand_computed():
    sample_logprobs, action_mask, scores, gold_logprobs, gold_mask = _batch()
    mask = correct_sample_mask(scores, action_mask)
    assert mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]  # 0.1 is not "correct"
    loss, stats = online_self_training_loss(sample_logprobs, mask, gold_logprobs, gold_mask)
    # correct samples: 7 tokens, NLL 6 + 16 = 22; gold: 3 tokens, NLL 4
    assert stats["sample_ce"].item() == pytest.approx(22 / 7)
    assert stats["gold_ce"].item() == pytest.approx(4 / 3)
    assert loss.item() == pytest.approx(0.5 * 22 / 7 + 0.5 * 4 / 3)
    assert stats["correct_samples"].item() == 2
    loss.backward()
    g = sample_logprobs.grad
    assert torch.allclose(g[0, :3], torch.full((3,), -0.5 / 7)) and torch.allclose(g[2], torch.full((4,), -0.5 / 7))
    assert (g[1] == 0).all() and g[0, 3] == 0  # the wrong sample and padding get no gradient (no NaN)
    assert torch.allclose(gold_logprobs.grad, torch.tensor([[-0.5 / 3, -0.5 / 3], [-0.5 / 3, 0.0]]))


def test_no_correct_sample_leaves_the_gold_half():
    sample_logprobs, action_mask, _, gold_logprobs, gold_mask = _batch()
    mask = correct_sample_mask(torch.tensor([0.1, 0.0, 0.1]), action_mask)
    loss, _ = online_self_training_loss(sample_logprobs, mask, gold_logprobs, gold_mask)
    assert loss.item() == pytest.approx(0.5 * 4 / 3)  # not renormalised (as the reference)
    assert not math.isnan(loss.item())


def test_micro_batches_add_up_to_the_mini_batch_loss():
    sample_logprobs, action_mask, scores, gold_logprobs, gold_mask = _batch()
    mask = correct_sample_mask(scores, action_mask)
    whole, _ = online_self_training_loss(sample_logprobs, mask, gold_logprobs, gold_mask)
    parts = [online_self_training_loss(sample_logprobs[s], mask[s], gold_logprobs[g], gold_mask[g],
                                       num_sample_tokens=7, num_gold_tokens=3)[0]
             for s, g in ((slice(0, 2), slice(0, 1)), (slice(2, 3), slice(1, 2)))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item())


# ---------------------------------------------------------------- offline self-training filter
def _svamp(shared_data, name: str, cot_type: str, n: int = 3):
    from megatron_reft.data import load_records

    path = shared_data / "mwp_reft" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    records, _ = load_records(str(path), cot_type)
    return records[:n]


def _score(records_and_responses, cot_type):
    from megatron_reft.reward import RewardConfig, RewardScorer

    responses = [r for _, r in records_and_responses]
    recs = [rec for rec, _ in records_and_responses]
    with RewardScorer(RewardConfig(cot_type=cot_type)) as scorer:
        results = scorer.score(responses, [r.answer for r in recs], [r.answer_type for r in recs])
    return [{"response": text, "correct": s.correct, "extracted": s.extracted}
            for text, s in zip(responses, results)]


def test_offline_filter_ncot_on_real_svamp(shared_data):
    from megatron_reft.data.prompts import ncot_target

    record = _svamp(shared_data, "svamp_nl.json", "ncot", 1)[0]
    gold_answer = record.answer
    wrong = str(float(gold_answer.replace(",", "")) + 7)
    scripted = [ncot_target(record.cot, gold_answer)]  # the gold CoT itself: a duplicate
    scripted += [ncot_target(f"Variant {i}: {record.cot}", gold_answer) for i in range(12)]  # 12 unique correct
    scripted.insert(3, ncot_target("A wrong path.", wrong))  # incorrect: dropped
    scripted.insert(5, ncot_target("Variant 1: " + record.cot, f"{float(gold_answer):.3f}"))  # same CoT, "72.000"
    scripted.insert(6, "no answer at all")  # invalid: dropped
    samples = _score([(record, text) for text in scripted], "ncot")
    assert [s["correct"] for s in samples].count(False) == 2  # the real scorer agrees with the script

    kept = offline_self_training_records(record, samples, "ncot")
    assert kept[0] is record  # gold first
    assert len(kept) == 11  # ≤ 10 samples + gold, though 12 unique correct ones were offered
    cots = [r.cot for r in kept]
    assert len(set(cots)) == 11 and cots[1:] == [f"Variant {i}: {record.cot.strip()}" for i in range(10)]
    assert all(r.answer == gold_answer and r.question == record.question for r in kept)
    assert [r.id for r in kept[1:3]] == [f"{record.id}-s1", f"{record.id}-s2"]
    assert all(r.dataset == "svamp" for r in kept)  # ids keep the dataset prefix


def test_offline_filter_pcot_on_real_svamp(shared_data):
    from megatron_reft.data.prompts import pcot_prefill

    records = _svamp(shared_data, "svamp_python_sdp.json", "pcot", 2)
    record = records[0]
    body = record.cot[len(pcot_prefill(record.question)):]  # what the policy writes after the prefill
    assert record.cot.startswith(pcot_prefill(record.question))
    renamed = record.cot.replace("result", "answer_value")
    scripted = [record.cot + "\n\nQuestion: trailing text the scorer cuts off",  # gold program: duplicate
                renamed,                                                       # a different correct program
                pcot_prefill(record.question) + "\n    return -12345\n",        # wrong answer
                renamed + "\n"]                                                # same program again
    samples = _score([(record, text) for text in scripted], "pcot")
    assert [s["correct"] for s in samples] == [True, True, False, True]
    kept = offline_self_training_records(record, samples, "pcot")
    assert [r.cot for r in kept] == [record.cot, renamed.strip()]
    assert body and sampled_cot(scripted[0], "pcot") == record.cot.strip()
    assert offline_self_training_records(record, samples, "pcot", max_samples=0) == [record]
