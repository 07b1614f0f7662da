"""Sampling at scale: k sampled CoTs per question, data-parallel, resumable (reft.md §6 voting@k,
pass@k; the same loop serves offline self-training's "100 samples per train question").

Layout on disk: a store directory with one JSON-lines file per writer (`rank{r}.jsonl`); each line
is one finished question {"id", "answer", "samples": [{response, extracted, status, correct,
reward}, ...]}, written and fsync'ed as soon as its batch is scored. An interrupted run is resumed
by running the same command again: every rank reads all files, skips the ids already present,
and samples only the rest. A line cut by a crash is not valid JSON and is ignored (its question is
sampled again); the writer trims it before appending. The DP size may change between runs.

Batching: a batch holds whole questions, about `batch_sequences` sequences (k copies of each
prompt), so the engine decodes many sequences at once while a finished batch is on disk before the
next starts; the generator drops finished sequences as it goes (generation/generate.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_reft import runtime


class SampleStore:
    """Per-question sample lines under one directory, one file per writing rank."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _files(self) -> list[Path]:
        return sorted(self.root.glob("rank*.jsonl")) if self.root.is_dir() else []

    def load(self) -> dict[str, dict]:
        """id -> question line, over all files (first complete line of an id wins)."""
        items: dict[str, dict] = {}
        for path in self._files():
            for line in path.read_text().splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption
                items.setdefault(str(item["id"]), item)
        return items

    def open_writer(self, rank: int):
        """Append handle for this rank's file, after trimming a partial last line."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"rank{rank}.jsonl"
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[:data.rfind(b"\n") + 1])
        return path.open("a")

    @staticmethod
    def append(handle, items: list[dict]) -> None:
        handle.write("".join(json.dumps(item) + "\n" for item in items))
        handle.flush()
        os.fsync(handle.fileno())


def _is_writer() -> bool:
    """One rank per data-parallel replica writes (all model-parallel ranks hold the same samples)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return True
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()


def batch_seed(base_seed: int, first_index: int, chunk: int) -> int:
    """Seed of one generate() call, from the run seed and the position of its questions: a rerun
    of the same questions in the same batches draws the same samples."""
    return (base_seed * 1_000_003 + first_index * 1_009 + chunk) % (2 ** 63)


@torch.no_grad()
def sample_questions(engine, tokenizer, records: list, config, scorer, k: int, temperature: float,
                     store: SampleStore, batch_sequences: int = 64, progress: bool = False) -> int:
    """Sample k responses for every record not yet in `store` (this rank's strided share) and
    append them; returns how many questions this rank sampled now."""
    from megatron_reft.data import encode_rl_prompts, eval_shard
    from megatron_reft.evaluation.run import response_text
    from megatron_reft.generation import SamplingParams, generate

    d = config.data
    done = set(store.load())
    runtime.barrier()  # every rank has read the store before anyone appends to it
    dp_rank, dp_size = runtime.dp_rank_and_size()
    index_of = {r.id: i for i, r in enumerate(records)}
    mine = [records[i] for i in eval_shard(len(records), dp_rank, dp_size) if str(records[i].id) not in done]
    prompts, kept, _ = encode_rl_prompts(tokenizer, mine, d.cot_type, d.max_prompt_length, "report")
    per_batch = max(1, batch_sequences // k)
    writer = store.open_writer(runtime.rank()) if _is_writer() else None
    bar = _question_bar(len(kept), progress)
    try:
        for start in range(0, len(kept), per_batch):
            recs, ps_ = kept[start:start + per_batch], prompts[start:start + per_batch]
            flat = [p for p in ps_ for _ in range(k)]
            params = SamplingParams(max_new_tokens=d.max_total_length - min(len(p) for p in flat),
                                    temperature=temperature, greedy=temperature == 0,
                                    max_total_length=d.max_total_length)
            tokens = []
            for chunk, lo in enumerate(range(0, len(flat), batch_sequences)):
                seed = batch_seed(config.trainer.seed, index_of[recs[0].id], chunk)
                tokens += generate(engine, flat[lo:lo + batch_sequences], tokenizer.eos_id, params,
                                   seed=seed, static_decode=config.model.cuda_graph_decode).tokens
            lines = _score_batch(tokenizer, recs, ps_, tokens, k, d.cot_type, scorer, response_text)
            if writer is not None:
                SampleStore.append(writer, lines)
            bar.update(len(recs))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    runtime.barrier()  # the store is complete once every rank is here
    return len(kept)


def _question_bar(total: int, enabled: bool):
    """Rank 0's progress over its own share of questions (the others' shares are the same size)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not (enabled and runtime.rank() == 0), desc="sampling", unit="question")


def _score_batch(tokenizer, recs, prompts, tokens, k, cot_type, scorer, response_text) -> list[dict]:
    # decoded after the prompt (docs/data.md "Response text"): exact for dummy-prefix tokenizers
    texts = [response_text(tokenizer, recs[i // k], toks, cot_type, prompts[i // k])
             for i, toks in enumerate(tokens)]
    owners = [recs[i // k] for i in range(len(texts))]
    results = scorer.score(texts, [r.answer for r in owners], [r.answer_type for r in owners])
    lines = []
    for q, record in enumerate(recs):
        samples = [{"response": texts[j], "extracted": results[j].extracted, "status": results[j].status,
                    "correct": bool(results[j].correct), "reward": results[j].reward}
                   for j in range(q * k, (q + 1) * k)]
        lines.append({"id": record.id, "answer": record.answer, "samples": samples})
    return lines


def sampled_metrics(store: SampleStore, records: list, k: int, p_correct: dict | None = None) -> dict:
    """maj_at_k / pass_at_k (/ rerank_at_k with `p_correct`: id -> P(correct) per sample) over ALL
    records: a question with no stored samples (prompt too long) counts as wrong, as in
    greedy_accuracy."""
    from megatron_reft.evaluation.voting import sample_metrics

    stored = store.load()
    items = [stored[str(r.id)]["samples"] for r in records if str(r.id) in stored]
    if p_correct is not None:
        items = [[{**s, "p_correct": p} for s, p in zip(stored[str(r.id)]["samples"], p_correct[str(r.id)])]
                 for r in records if str(r.id) in stored]
    metrics = sample_metrics(items, k) if items else {"maj_at_k": 0.0, "pass_at_k": 0.0}
    share = len(items) / max(len(records), 1)
    return {name: value * share for name, value in metrics.items()} | {"sampled_items": len(items)}


def check_store_settings(store: SampleStore, settings: dict) -> None:
    """A store holds samples of one setting (k, temperature, checkpoint): resuming with others
    would mix them. Raises ConfigError naming the difference; writes the settings on first use."""
    meta = store.root / "settings.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        diff = [f"{key}: stored {saved.get(key)!r}, now {value!r}"
                for key, value in settings.items() if saved.get(key) != value]
        if diff:
            raise runtime.ConfigError(f"{store.root}: holds samples of other settings ({'; '.join(diff)}); "
                                      "use another --samples-dir or the same settings")
    runtime.barrier()
    if runtime.rank() == 0 and not meta.exists():
        store.root.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(settings) + "\n")


def evaluate_sampled(engine, data, config, scorer, k: int, temperature: float, store_dir,
                     reranker=None) -> dict:
    """Sample (or finish sampling) k responses per eval question; the JSON line's extra fields."""
    from megatron_reft.evaluation.run import _all_gather

    store = SampleStore(store_dir)
    sampled_now = sample_questions(engine, data.tokenizer, data.eval, config, scorer, k, temperature, store,
                                   batch_sequences=config.ppo.generation_micro_batch or 64,
                                   progress=config.trainer.progress_bar)
    sampled_now = sum(_all_gather([sampled_now if _is_writer() else 0]))
    p_correct = None
    if reranker is not None:  # reft.md §6 reranking: P(correct) of every stored sample
        from megatron_reft.evaluation.reward_model import score_stored_samples

        p_correct = score_stored_samples(reranker, data.tokenizer, data.eval, store.load(),
                                         config.data.max_total_length, config.trainer.micro_batch_size)
    metrics = sampled_metrics(store, data.eval, k, p_correct)
    return {"k": k, "temperature": temperature, **metrics, "sampled_now": sampled_now,
            "samples_dir": str(store.root)}
