"""``CementLoss`` across 2 and 4 gloo processes equals the single-process loss on the concatenated batch.

Each rank is this file run as a script (``python test_distributed_loss.py --rank r ...``), joined by a file
rendezvous, so no port is needed and nothing has to be pickled. Every rank builds the same global batch from
a fixed seed, keeps its own slice, runs every (form, impl, hard columns) case and saves loss and gradients; the test
compares them with ``cement_loss_reference`` on the whole batch in this process.

What "equal" means per form (W ranks, single-process loss L over the M = W * B pairs):

- ``local_loss`` + ``gather_with_grad``: rank r's loss covers its B rows and B columns, so the mean of the
  ranks' losses is L; the all-gather's backward sums every rank's gradient into the owner, so rank r's
  feature gradients are W * dL/d(its slice) (DDP's averaging then gives dL/dtheta). Its ``logit_scale`` is
  local: the mean over ranks of d loss_r / ds is dL/ds.
- global form with ``gather_with_grad``: every rank's loss is L; its feature gradients are W * dL/d(slice);
  d loss_r / ds = dL/ds.
- global form without ``gather_with_grad``: every rank's loss is L; gradients reach only the rank's own
  features (OpenCLIP's behaviour): exactly dL/d(slice); d loss_r / ds = dL/ds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BATCH = 5  # per rank; odd on purpose
DIM = 6
NUM_HARD = 2
SETTINGS = {
    "margin_hard": 0.2,
    "margin_batch": 0.3,
    "difficulty_offset": 0.1,
    "difficulty_temperature": 0.2,
    "hard_weight": 0.5,
    "hard_margin_difficulty": True,  # the per-pair scaling slices the gathered rows: tested across ranks
}
FORMS = {  # name -> (local_loss, gather_with_grad)
    "local-gather-grad": (True, True),
    "global-gather-grad": (False, True),
    "global": (False, False),
}
IMPLS = ("reference", "chunked")
#: where the hard negatives enter (``CementLoss(hard_columns=...)``); "separate" keeps them in H_i only
COLUMNS = ("joint", "separate")


def global_batch(world_size: int) -> dict[str, torch.Tensor]:
    """The concatenated batch (identical on every rank): features, hard negatives, scores, mask, scale."""
    generator = torch.Generator().manual_seed(1234 + world_size)
    total = world_size * BATCH
    mask = torch.rand(total, NUM_HARD, generator=generator) > 0.3
    mask[0] = False
    image = F.normalize(torch.randn(total, DIM, generator=generator), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(total, DIM, generator=generator), dim=1)
    # hard negatives near their caption, as real ones are: they hold a share of their row in both column forms
    hard = text[:, None] + 0.3 * torch.randn(total, NUM_HARD, DIM, generator=generator)
    return {
        "image_features": image,
        "text_features": text,
        "hn_text_features": F.normalize(hard, dim=-1),
        "hn_scores": torch.rand(total, NUM_HARD, generator=generator),
        "hn_mask": mask,
        "logit_scale": torch.tensor(20.0),
    }


def _worker(rank: int, world_size: int, directory: Path) -> None:
    import torch.distributed as dist

    from slipform_plugin.losses import CementLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory / 'rendezvous'}", rank=rank, world_size=world_size)
    batch = global_batch(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    cases = [(form, impl, columns) for form in FORMS for impl in IMPLS for columns in COLUMNS]
    for form, impl, columns in cases:
        local_loss, gather_with_grad = FORMS[form]
        local = {name: value[rows].clone() for name, value in batch.items() if name != "logit_scale"}
        for name in ("image_features", "text_features", "hn_text_features"):
            local[name].requires_grad_()
        scale = batch["logit_scale"].clone().requires_grad_()
        loss_fn = CementLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world_size,
            impl=impl,
            hard_columns=columns,
            **SETTINGS,
        )
        loss = loss_fn(
            local["image_features"],
            local["text_features"],
            scale,
            hn_text_features=local["hn_text_features"],
            hn_scores=local["hn_scores"],
            hn_mask=local["hn_mask"],
        )
        loss.backward()
        results[(form, impl, columns)] = {
            "loss": loss.detach(),
            "image_features": local["image_features"].grad,
            "text_features": local["text_features"].grad,
            "hn_text_features": local["hn_text_features"].grad,
            "logit_scale": scale.grad,
        }
    torch.save(results, directory / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world_size: int, directory: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(rank), "--world-size", str(world_size), "--dir", str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(world_size)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for rank, process in enumerate(processes):
        assert process.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(world_size)]


def single_process(world_size: int, columns: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients on the whole batch in one process: the reference formula ("joint"), or the
    single-process ``CementLoss`` ("separate", itself tested against a hand-written CLIP loss + H_i)."""
    from slipform_plugin.losses import CementLoss
    from slipform_plugin.losses.reference import cement_loss_reference

    batch = global_batch(world_size)
    for name in ("image_features", "text_features", "hn_text_features", "logit_scale"):
        batch[name].requires_grad_()
    if columns == "joint":
        loss = cement_loss_reference(**batch, **SETTINGS)
    else:
        loss_fn = CementLoss(impl="reference", hard_columns=columns, **SETTINGS)
        loss = loss_fn(
            batch["image_features"],
            batch["text_features"],
            batch["logit_scale"],
            hn_text_features=batch["hn_text_features"],
            hn_scores=batch["hn_scores"],
            hn_mask=batch["hn_mask"],
        )
    loss.backward()
    grads = {name: batch[name].grad for name in ("image_features", "text_features", "hn_text_features", "logit_scale")}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Per world size: every rank's results (computed once per module) and the single-process reference."""
    cache: dict[int, tuple[list[dict], dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]]] = {}

    def get(world_size: int, columns: str):
        if world_size not in cache:
            results = run_ranks(world_size, tmp_path_factory.mktemp(f"w{world_size}"))
            cache[world_size] = (results, {c: single_process(world_size, c) for c in COLUMNS})
        results, expected = cache[world_size]
        return (results, *expected[columns])

    return get


@pytest.mark.parametrize("columns", COLUMNS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_equals_single_process(rank_results, world_size, form, impl, columns):
    results, expected_loss, expected = rank_results(world_size, columns)
    local_loss, gather_with_grad = FORMS[form]
    factor = world_size if gather_with_grad else 1  # the all-gather's backward sums all ranks' gradients
    close = {"rtol": 1e-5, "atol": 1e-6}
    per_rank = [result[(form, impl, columns)] for result in results]
    losses = torch.stack([item["loss"] for item in per_rank])
    scale_grads = torch.stack([item["logit_scale"] for item in per_rank])
    if local_loss:
        torch.testing.assert_close(losses.mean(), expected_loss, **close, msg="mean of the ranks' losses")
        assert not torch.allclose(losses, losses[0].expand_as(losses)), "local losses should differ between ranks"
        torch.testing.assert_close(scale_grads.mean(), expected["logit_scale"], **close, msg="mean d loss / ds")
    else:
        for rank in range(world_size):
            torch.testing.assert_close(losses[rank], expected_loss, **close, msg=f"rank {rank} loss")
            torch.testing.assert_close(scale_grads[rank], expected["logit_scale"], **close, msg=f"rank {rank} d/ds")
    for rank, item in enumerate(per_rank):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for name in ("image_features", "text_features", "hn_text_features"):
            want = factor * expected[name][rows]
            # fp32 tolerance relative to the tensor's largest entry (hard-negative gradients are tiny).
            error = (item[name] - want).abs().max().item()
            bound = 1e-7 + 1e-4 * want.abs().max().item()
            assert error <= bound, f"rank {rank} d loss / d {name}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_column_cases_differ(rank_results, world_size):
    """The "separate" case gives the hard negatives other gradients than "joint" (H_i's only): two losses tested."""
    results, _, _ = rank_results(world_size, "joint")
    key = ("local-gather-grad", "chunked")
    joint = torch.cat([result[(*key, "joint")]["hn_text_features"] for result in results])
    separate = torch.cat([result[(*key, "separate")]["hn_text_features"] for result in results])
    assert (joint - separate).abs().max() > 0.05 * joint.abs().max()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    cli = parser.parse_args()
    _worker(cli.rank, cli.world_size, cli.dir)
