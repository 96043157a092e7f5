"""Issue 16: a run saved on one number of ranks resumes on another (ZeRO-2 and ZeRO-3, through DeepSpeed's
universal checkpoint): the weights arrive exactly, the EMA and data position carry over (every sample of the
epoch in progress is read exactly once, counted from the keys every rank logs), and the loss goes on at the
level of an uninterrupted run at the new size."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainrun import events, losses, metrics, run

from data_pipeline.synthetic import write_synthetic
from trainer.inference.export import trained_weights

pytestmark = pytest.mark.slow
EPOCH = 64  # small_epoch: 8 shards, one per reader at 4 ranks x 2 workers
BATCH = 8  # experiment=tiny_cpu


@pytest.fixture(scope="module")
def small_epoch(tmp_path_factory) -> Path:
    """8 shards x 8 synthetic 32px samples: an epoch of a few steps (the cost of these tests is in starting and
    resharding ranks, not in the steps, so the epoch is as short as the reader layout allows)."""
    out = tmp_path_factory.mktemp("small_epoch")
    write_synthetic(str(out), num=EPOCH, shard_size=EPOCH // 8, size=32, seed=0, progress=False)
    return out


def epoch_keys(run_dir, ranks: int) -> Counter:
    """How often each key of epoch 0 was trained on, over every rank of every run in ``run_dir``."""
    seen: Counter = Counter()
    for rank in range(ranks):
        path = run_dir / f"keys_rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            r = json.loads(line)
            seen.update(k for k, e in zip(r["keys"], r["epoch"], strict=True) if e == 0)
    return seen


def elastic(
    tmp_path,
    shards,
    stage: int,
    before: int,
    after: int,
    precision: str,
    saved_at: int = 2,
    dump: bool = False,
    reference: bool = True,
) -> dict:
    """``before`` ranks to step ``saved_at``, then ``after`` ranks through the rest of epoch 0 and beyond.
    ``dump``: first resume on ``after`` ranks at the saved step itself (nothing trained, nothing saved) and dump
    the live fp32 weights to ``final_weights.safetensors``, so they can be compared with the checkpoint's.
    ``reference``: also train an uninterrupted run on ``after`` ranks, for the loss level."""
    common = [f"deepspeed.zero_stage={stage}", f"precision={precision}", "faults.log_keys=true",
              "checkpoint.every=1000", "eval.every=0"]  # fmt: skip
    left = EPOCH - saved_at * before * BATCH
    assert left > 0, "the save must fall inside epoch 0"
    total = saved_at + -(-left // (after * BATCH)) + 3  # past the end of epoch 0 on every reader
    run_dir = tmp_path / "elastic"
    run(run_dir, shards, [*common, f"max_steps={saved_at}"], nproc=before)
    saved = {}
    if dump:  # read now: checkpoint retention may drop the saved step once the resumed run saves its own
        saved = trained_weights(run_dir / "checkpoints" / f"step_{saved_at:08d}", ema=False)
        run(run_dir, shards, [*common, f"max_steps={saved_at}", "faults.dump_weights=true"], nproc=after)
    resumed = run(run_dir, shards, [*common, f"max_steps={total}"], nproc=after)
    ref_dir = tmp_path / "uninterrupted" if reference else None
    if ref_dir:
        run(ref_dir, shards, [*common, f"max_steps={total}"], nproc=after)
    return {"dir": run_dir, "ref": ref_dir, "total": total, "saved_at": saved_at, "log": resumed.stderr,
            "ranks": max(before, after), "saved_weights": saved}  # fmt: skip


def adam_step(folder) -> int:
    """The optimizer's step count in rank 0's partition of a checkpoint."""
    from trainer.engine.safe_load import weights_only_loads

    path = next((folder / "model").glob("*zero_pp_rank_0_*optim_states.pt"))
    with weights_only_loads(path):
        sd = torch.load(path, map_location="cpu", weights_only=True)

    def find(x):
        if isinstance(x, dict):
            if "step" in x and not isinstance(x["step"], dict):
                return int(x["step"])
            return next((v for v in map(find, x.values()) if v is not None), None)
        if isinstance(x, list | tuple):
            return next((v for v in map(find, x) if v is not None), None)
        return None

    return find(sd["optimizer_state_dict"])


def check(r: dict) -> None:
    rows = metrics(r["dir"])
    assert events(rows, "resumed_from")[-1]["step"] == r["saved_at"]
    seen = epoch_keys(r["dir"], r["ranks"])
    assert len(seen) == EPOCH, f"{EPOCH - len(seen)} samples of epoch 0 never trained on"
    assert max(seen.values()) == 1, f"trained twice: {[k for k, n in seen.items() if n > 1][:5]}"
    # the optimizer state came along: Adam's step count went on from the saved step, and so did the EMA's
    final = r["dir"] / "checkpoints" / f"step_{r['total']:08d}"
    assert adam_step(final) == r["total"]
    assert int(json.loads((final / "trainer_state.json").read_text())["ema_updates"]) == r["total"]
    if r["ref"] is None:
        return
    # the loss is at the level of an uninterrupted run at the new size (within 15%: tiny models on tiny
    # batches are noisy; continuity itself is checked exactly, above and in the weights test)
    got, ref = losses(rows), losses(metrics(r["ref"]))
    tail = range(r["saved_at"] + 1, r["total"] + 1)
    mean_got, mean_ref = (sum(x[s] for s in tail) / len(tail) for x in (got, ref))
    assert abs(mean_got - mean_ref) < 0.15 * mean_ref, (mean_got, mean_ref)


def test_elastic_zero2_bf16_two_ranks_resume_on_one_with_exact_weights(tmp_path, small_epoch):
    r = elastic(tmp_path, small_epoch, stage=2, before=2, after=1, precision="bf16", dump=True)
    check(r)
    # the weights arrive exactly: the live fp32 weights of the 1-rank resume at the saved step (dumped before it
    # trained on) are the 2-rank checkpoint's
    saved = r["saved_weights"]
    live = load_file(str(r["dir"] / "final_weights.safetensors"))
    assert sorted(live) == sorted(saved) and all(torch.equal(live[k], saved[k]) for k in saved)


def test_elastic_zero3_two_ranks_resume_on_four(tmp_path, small_epoch):
    # no uninterrupted 4-rank reference (a third of this test's time): the loss-level check against one is
    # made by the two ZeRO-2 tests; here every sample once, Adam's and the EMA's step counts carry the proof
    check(elastic(tmp_path, small_epoch, stage=3, before=2, after=4, precision="fp32", reference=False))


def test_elastic_zero2_one_rank_resumes_on_two(tmp_path, small_epoch):
    check(elastic(tmp_path, small_epoch, stage=2, before=1, after=2, precision="fp32"))
