"""CementLoss / InfoNCELoss semantics: ClipLoss at K = 0 (one and two processes), InfoNCE at zero margins,
masks, margins, the hard-negative accuracy and bad input."""

from __future__ import annotations

import os
import re
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.overrides import TorchFunctionMode

from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS
from slipform_plugin.losses import RECOMMENDED_CEMENT, CementLoss, HardNegativeMeter, InfoNCELoss, cement_loss_reference
from slipform_plugin.losses.reference import hard_negative_pair_wins, hard_negative_row_wins, hard_negative_wins

IMPLS = ["reference", "chunked"]


def features(batch: int, dim: int, negatives: int = 0, seed: int = 0, requires_grad: bool = True):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_(requires_grad)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_(requires_grad)
    hard = F.normalize(torch.randn(batch, negatives, dim, generator=generator), dim=-1).requires_grad_(requires_grad)
    scores = torch.rand(batch, negatives, generator=generator)
    mask = torch.rand(batch, negatives, generator=generator) > 0.3
    return image, text, hard, scores, mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def clip_plus_hard_term(image, text, scale, weighted_hard_sum):
    """OpenCLIP's symmetric loss of ``[B, D]`` features plus ``lambda sum_i H_i / (2B)``, written by hand."""
    labels = torch.arange(image.shape[0])
    clip = F.cross_entropy(scale * image @ text.T, labels) + F.cross_entropy(scale * text @ image.T, labels)
    return (clip + weighted_hard_sum / image.shape[0]) / 2


def recording_parser():
    """An argparse parser with Slipform's flags whose ``error`` records its message before exiting."""
    import argparse

    from slipform_plugin.integration import add_arguments

    errors: list[str] = []

    class Recorder(argparse.ArgumentParser):
        def error(self, message):
            errors.append(message)
            raise SystemExit(2)

    recorder = Recorder()
    add_arguments(recorder)
    return recorder, errors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [None, -2.5])
def test_infonce_without_negatives_equals_clip_loss(impl, bias):
    image, text, *_ = features(9, 12)
    scale = torch.tensor(30.0, requires_grad=True)
    expected = ClipLoss()(image, text, scale, logit_bias=None if bias is None else torch.tensor(bias))
    got = InfoNCELoss(impl=impl)(image, text, scale, logit_bias=None if bias is None else torch.tensor(bias))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(got, image, text, scale), grads(expected, image, text, scale)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    # Cement with its margins at zero is InfoNCE.
    zero = CementLoss(margin_hard=0.0, margin_batch=0.0, impl=impl)(image, text, scale)
    torch.testing.assert_close(zero, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_margins_are_infonce_with_hard_negative_columns(impl):
    image, text, hard, scores, mask = features(7, 10, negatives=3)
    scale = torch.tensor(17.0)
    loss = CementLoss(margin_hard=0.0, margin_batch=0.0, impl=impl)(image, text, scale, None, hard, scores, mask)
    # The textbook form: image-to-text rows over [captions | own real negatives], text-to-image over images.
    row_logits = torch.cat(
        [scale * image @ text.T, (scale * torch.einsum("bd,bkd->bk", image, hard)).masked_fill(~mask, -torch.inf)], 1
    )
    labels = torch.arange(7)
    expected = (F.cross_entropy(row_logits, labels) + F.cross_entropy(scale * text @ image.T, labels)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(loss, image, text, hard), grads(expected, image, text, hard)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("margin_hard", [0.0, 0.2])
def test_hard_weight_adds_the_textbook_hard_negative_term(impl, margin_hard):
    """lambda * H_i: each caption against its own real negatives only, a cross-entropy of its own."""
    image, text, hard, scores, mask = features(7, 10, negatives=3, seed=4)
    mask[2] = False  # a row without real negatives: H_i = 0
    scale, weight = torch.tensor(17.0, requires_grad=True), 0.6
    loss = CementLoss(margin_hard=margin_hard, margin_batch=0.0, hard_weight=weight, impl=impl)(
        image, text, scale, None, hard, scores, mask
    )
    hard_logits = scale * torch.einsum("bd,bkd->bk", image, hard) + scale.detach() * margin_hard * scores
    hard_logits = hard_logits.masked_fill(~mask, -torch.inf)
    row_logits = torch.cat([scale * image @ text.T, hard_logits], 1)
    own_logits = torch.cat([scale * (image * text).sum(-1, keepdim=True), hard_logits], 1)
    labels = torch.arange(7)
    expected = (
        F.cross_entropy(row_logits, labels)
        + F.cross_entropy(scale * text @ image.T, labels)
        + weight * F.cross_entropy(own_logits, torch.zeros(7, dtype=torch.long))
    ) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(loss, image, text, hard, scale), grads(expected, image, text, hard, scale)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # lambda = 0 is the loss without the term; a positive lambda only adds (H_i >= 0).
    without = CementLoss(margin_hard=margin_hard, margin_batch=0.0, impl=impl)
    assert loss > without(image, text, scale, None, hard, scores, mask)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_negatives_are_ignored(impl):
    image, text, hard, scores, mask = features(6, 8, negatives=4)
    loss_fn = CementLoss(impl=impl)
    base = loss_fn(image, text, 10.0, None, hard, scores, mask)
    moved = hard.detach().clone()
    moved[~mask] = -moved[~mask]  # change only the masked negatives
    torch.testing.assert_close(loss_fn(image, text, 10.0, None, moved, scores, mask), base)
    none_real = torch.zeros_like(mask)
    no_negatives = loss_fn(image, text, 10.0)
    torch.testing.assert_close(loss_fn(image, text, 10.0, None, hard, scores, none_real), no_negatives)
    (grad_hard,) = grads(loss_fn(image, text, 10.0, None, hard, scores, mask), hard)
    assert torch.count_nonzero(grad_hard[~mask]) == 0 and torch.count_nonzero(grad_hard[mask]) > 0


def test_margins_raise_the_loss_and_concreteness_weights_them():
    image, text, hard, _, _ = features(8, 16, negatives=2)
    mask = torch.ones(8, 2, dtype=torch.bool)
    low, high = torch.full((8, 2), 0.1), torch.full((8, 2), 0.9)
    loss = lambda scores, **kw: CementLoss(impl="reference", **kw)(image, text, 20.0, None, hard, scores, mask)
    off = loss(low, margin_hard=0.0, margin_batch=0.0)
    assert loss(low, margin_hard=0.2, margin_batch=0.0) > off
    assert loss(high, margin_hard=0.2, margin_batch=0.0) > loss(low, margin_hard=0.2, margin_batch=0.0)
    assert loss(low, margin_hard=0.0, margin_batch=0.1) > off


def test_difficulty_margin_is_a_constant_in_the_gradient():
    """The gradient equals that of the same logits with the margin added as a precomputed constant."""
    image, text, *_ = features(5, 6)
    scale = torch.tensor(12.0, requires_grad=True)
    mu, delta, gamma = 0.2, 0.05, 0.1
    loss = cement_loss_reference(
        image, text, scale, margin_batch=mu, difficulty_offset=delta, difficulty_temperature=gamma
    )
    with torch.no_grad():
        sim = image @ text.T
        row_margin = 12.0 * mu * torch.sigmoid((sim - sim.diag()[:, None] + delta) / gamma)
        col_margin = 12.0 * mu * torch.sigmoid((sim.T - sim.diag()[:, None] + delta) / gamma)
        row_margin.fill_diagonal_(0)
        col_margin.fill_diagonal_(0)
    labels = torch.arange(5)
    expected = (
        F.cross_entropy(scale * image @ text.T + row_margin, labels)
        + F.cross_entropy(scale * text @ image.T + col_margin, labels)
    ) / 2
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads(loss, image, text, scale), grads(expected, image, text, scale)):
        torch.testing.assert_close(g, e)


def test_hard_negative_accuracy_is_metered_not_returned():
    image, text, hard, scores, mask = features(4, 8, negatives=2)
    text = image.detach().clone()  # positives are perfect: every row with a real negative wins
    loss_fn = CementLoss(impl="reference")
    out = loss_fn(image, text, 10.0, None, hard, scores, mask, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    assert loss_fn.hard_negative_meter.pop() == 1.0
    assert loss_fn.hard_negative_meter.pop() is None


def test_hard_negative_accuracy_by_kind_counts_each_real_negative_under_its_kind():
    """Per-kind accuracy, against a count by hand: each real negative is a win when the caption beats it."""
    image, text, hard, scores, mask = features(6, 8, negatives=3, seed=3)
    kinds = torch.tensor([[0, 4, 4], [4, 0, 5], [5, 5, 0], [0, 4, 4], [4, 0, 5], [5, 5, 0]])
    kinds[~mask] = -1  # padding carries -1 (as packed batches do); it must be ignored, not rejected
    loss_fn = CementLoss(impl="reference")
    loss_fn(image, text, 10.0, None, hard, scores, mask, hn_kinds=kinds)
    loss_fn(image, text, 10.0, None, hard, scores, mask, hn_kinds=kinds)  # counts accumulate until popped
    positive = (image * text).sum(-1)
    expected = {}
    for kind_id, kind in enumerate(HARD_NEGATIVE_KINDS):
        wins = counted = 0
        for row in range(6):
            for column in range(3):
                if mask[row, column] and kinds[row, column] == kind_id:
                    counted += 1
                    wins += bool(positive[row] > image[row] @ hard[row, column])
        if counted:
            expected[kind] = wins / counted
    assert expected and set(expected) <= {"replace_object", "swap_attributes", "swap_objects"}
    assert loss_fn.hard_negative_meter.pop_kinds() == pytest.approx(expected)
    assert loss_fn.hard_negative_meter.pop_kinds() == {}
    # The kinds are logging only: the loss is the same with and without them.
    torch.testing.assert_close(
        loss_fn(image, text, 10.0, None, hard, scores, mask, hn_kinds=kinds),
        loss_fn(image, text, 10.0, None, hard, scores, mask),
    )


def test_pair_wins_agree_with_row_wins():
    image, text, hard, _, mask = features(7, 5, negatives=4, seed=5)
    pair_wins = hard_negative_pair_wins(image, text, hard, mask)
    assert pair_wins.shape == (7, 4) and not pair_wins[~mask].any()
    wins, has_negative = hard_negative_wins(image, text, hard, mask)
    torch.testing.assert_close(has_negative, mask.any(1))
    torch.testing.assert_close(wins, (pair_wins | ~mask).all(1) & mask.any(1))


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value back to Python (each one a host-device sync on a GPU)."""

    READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            caller = traceback.extract_stack(limit=2)[0]
            self.reads.append(f"{func.__name__} at {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def test_hard_negative_meter_never_reads_the_device_while_counting():
    """The per-step updates run on meta tensors, which have no values: any read-back would raise."""
    image, text, hard, _, mask = features(6, 8, negatives=3, seed=3)
    kinds = torch.randint(0, len(HARD_NEGATIVE_KINDS), (6, 3))
    pair_wins = hard_negative_pair_wins(image, text, hard, mask)
    wins, has_negative = hard_negative_row_wins(pair_wins, mask)
    meter = HardNegativeMeter()
    for _ in range(2):
        meter.update(wins.sum().to("meta"), has_negative.sum().to("meta"))
        meter.update_kinds(pair_wins.to("meta"), mask.to("meta"), kinds.to("meta"))
    loss_fn = CementLoss(impl="reference", check_finite=False)
    loss_fn._meter_kinds(pair_wins.to("meta"), mask.to("meta"), kinds.to("meta"))
    with pytest.raises(RuntimeError, match="meta"):
        meter.pop()  # the one read-back, at log time


@pytest.mark.parametrize(("check_finite", "most_reads"), [(False, 2), (True, 4)])
def test_recommended_loss_reads_the_device_a_fixed_few_times_per_call(check_finite, most_reads):
    """Without the value checks only the logit scale is read back (the kernels take it as a number); with them,
    one read for the feature checks and one for the kind ids, not one per tensor, and never one for logging."""
    image, text, hard, scores, mask = features(8, 16, negatives=3, seed=4)
    kinds = torch.randint(0, len(HARD_NEGATIVE_KINDS), (8, 3))
    loss_fn = CementLoss(**RECOMMENDED_CEMENT, impl="chunked", check_finite=check_finite)
    with HostReads() as mode:
        loss_fn(image, text, torch.tensor(10.0), None, hard, scores, mask, hn_kinds=kinds)
    assert len(mode.reads) <= most_reads, mode.reads
    assert not [read for read in mode.reads if "__init__.py" in read and not check_finite], mode.reads
    assert loss_fn.hard_negative_meter.pop() is not None and loss_fn.hard_negative_meter.pop_kinds()


def test_kind_ids_outside_the_kinds_are_not_counted_when_unchecked(caplog):
    image, text, hard, scores, _ = features(4, 8, negatives=2, seed=2)
    mask = torch.ones(4, 2, dtype=torch.bool)
    kinds = torch.tensor([[0, 7], [0, -3], [0, 0], [0, 0]])
    loss_fn = CementLoss(impl="reference", check_finite=False)
    loss_fn(image, text, 10.0, None, hard, scores, mask, hn_kinds=kinds)
    with caplog.at_level("WARNING", logger="slipform_plugin.losses"):
        by_kind = loss_fn.hard_negative_meter.pop_kinds()
    assert list(by_kind) == [HARD_NEGATIVE_KINDS[0]]
    positive = (image * text).sum(-1)
    kind_zero = [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]  # the real negatives with a valid id
    wins = [bool(positive[row] > image[row] @ hard[row, column]) for row, column in kind_zero]
    assert by_kind[HARD_NEGATIVE_KINDS[0]] == pytest.approx(sum(wins) / len(wins))
    assert loss_fn.hard_negative_meter.ignored_kind_ids == 2
    assert "2 real negatives had kind ids outside [0, 7)" in caplog.text


def test_hard_negative_meter_takes_plain_counts():
    meter = HardNegativeMeter()
    meter.update(3, 4)
    meter.update(torch.tensor(1), torch.tensor(4))
    assert meter.pop() == pytest.approx(0.5)
    meter.update(0, 0)
    assert meter.pop() is None and meter.pop_kinds() == {}


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        (
            torch.zeros(4, 3, dtype=torch.long),
            r"CementLoss: hn_kinds: expected shape \(4, 2\) \(\[B, K\]\), got \(4, 3\)",
        ),
        (torch.zeros(4, 2), "CementLoss: hn_kinds: expected an integer tensor of kind ids, got torch.float32"),
        (torch.full((4, 2), 7), r"CementLoss: hn_kinds: expected kind ids in \[0, 7\) \(HARD_NEGATIVE_KINDS\), got"),
    ],
)
def test_bad_hard_negative_kinds_are_refused(kinds, message):
    image, text, hard, scores, _ = features(4, 8, negatives=2)
    with pytest.raises(ValueError, match=message):
        CementLoss(impl="reference")(image, text, 10.0, None, hard, scores, None, hn_kinds=kinds)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, i, t, h: f(i[:0], t[:0], 10.0), "CementLoss: image_features: expected a non-empty batch"),
        (
            lambda f, i, t, h: f(i, t[:3], 10.0),
            "CementLoss: text_features: expected the shape of image_features (4, 8), got (3, 8)",
        ),
        (
            lambda f, i, t, h: f(i, t.double(), 10.0),
            "CementLoss: text_features: expected dtype torch.float32 like image_features, got torch.float64",
        ),
        (
            lambda f, i, t, h: f(i, t, -1.0),
            "CementLoss: logit_scale: expected a finite value > 0 (the exponentiated scale), got -1.0",
        ),
        (
            lambda f, i, t, h: f(i, t, 10.0, None, h[:, :, :3]),
            "CementLoss: hn_text_features: expected shape [B=4, K, D=8], got (4, 2, 3)",
        ),
        (
            lambda f, i, t, h: f(i, t, 10.0, None, h, None, torch.ones(4, 1, dtype=torch.bool)),
            "CementLoss: hn_mask: expected shape [B=4, K=2], got (4, 1)",
        ),
        (
            lambda f, i, t, h: f(i, t, 10.0, None, h, torch.full((4, 2), 2.0)),
            "CementLoss: hn_scores: expected values in [0, 1], got min 2.0, max 2.0",
        ),
        (
            lambda f, i, t, h: f(i * float("nan"), t, 10.0),
            "CementLoss: image_features: expected finite values, got NaN",
        ),
        (
            lambda f, i, t, h: f(i, t, 10.0, None, h * float("inf")),
            "CementLoss: hn_text_features: expected finite values, got Inf",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    image, text, hard, _, _ = features(4, 8, negatives=2, requires_grad=False)
    with pytest.raises(ValueError, match=None) as raised:
        call(CementLoss(impl="reference"), image, text, hard)
    assert message in str(raised.value)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_inputs_are_checked_once(impl, monkeypatch):
    import slipform_plugin.kernels._validate as validate_module

    calls = []
    original = validate_module._validate
    monkeypatch.setattr(validate_module, "_validate", lambda *a, **k: calls.append(k) or original(*a, **k))
    image, text, hard, scores, mask = features(4, 8, negatives=2)
    loss = CementLoss(impl=impl)(image, text, 10.0, None, hard, scores, mask)
    assert torch.isfinite(loss)
    assert len(calls) == 1 and calls[0]["check_finite"] is True


def test_bad_settings_get_a_clear_error():
    with pytest.raises(ValueError, match="difficulty_temperature must be > 0, got 0"):
        CementLoss(difficulty_temperature=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        CementLoss(impl="cuda")
    with pytest.raises(ValueError, match="use_horovod is not supported"):
        CementLoss(use_horovod=True)


def test_margin_gate_opens_with_the_excess_hard_negative_accuracy():
    """hn-accuracy gate: closed (InfoNCE) while negatives tie with the positive, opens as 1 - m^n when all win."""
    image, _, hard, scores, mask = features(6, 8, negatives=3)
    text = image.detach().clone()  # perfect positives: every row with a real negative wins
    margins = dict(margin_hard=0.2, margin_batch=0.1)
    gated = CementLoss(impl="reference", margin_gate="hn-accuracy", gate_momentum=0.5, **margins)
    assert gated.gate == 0.0
    for step in range(1, 4):
        loss = gated(image, text, 10.0, None, hard, scores, mask)
        factor = 1 - 0.5**step  # the excess accuracy is 1 at every step
        assert gated.gate == pytest.approx(factor)
        expected = cement_loss_reference(
            image, text, 10.0, hard, scores, mask, margin_hard=0.2 * factor, margin_batch=0.1 * factor
        )
        torch.testing.assert_close(loss, expected)
    # In eval mode the gate is used but not updated.
    gated.eval()
    gated(image, text, 10.0, None, hard, scores, mask)
    assert gated.gate == pytest.approx(1 - 0.5**3)
    # Negatives identical to the positive never win: the excess accuracy is below chance and the gate stays
    # shut, so the loss is InfoNCE with the negatives as columns, exactly.
    shut = CementLoss(impl="chunked", margin_gate="hn-accuracy", **margins)
    copies = text.detach().unsqueeze(1).expand(-1, 3, -1).clone()
    loss = shut(image, text, 10.0, None, copies, scores, mask)
    assert shut.gate == 0.0 and shut.gate_state < 0
    expected = InfoNCELoss(impl="reference")(image, text, 10.0, None, copies, scores, mask)
    torch.testing.assert_close(loss, expected)
    # The default gate is "none": full margins from the first call.
    assert CementLoss().gate == 1.0


def test_margin_gate_settings_are_checked():
    with pytest.raises(ValueError, match=re.escape("margin_gate must be one of ('none', 'hn-accuracy'), got 'step'")):
        CementLoss(margin_gate="step")
    with pytest.raises(ValueError, match=re.escape("gate_momentum must be in [0, 1), got 1.0")):
        CementLoss(margin_gate="hn-accuracy", gate_momentum=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Two gloo processes: equal to OpenCLIP's ClipLoss at K = 0, and to the single-process loss with negatives.


#: caption separation with thresholds low enough that random features (cosine about 0) activate some hinges
CAPTION_SEPARATION = dict(text_weight=2.0, text_margin=1.5, hard_columns="separate", hard_weight=1.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text, hard, scores, mask = features(4 * world, 8, negatives=2, seed=3)
        rows = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for local_loss, gather_with_grad in [(False, False), (True, True), (False, True)]:
            kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
            for name, loss_fn in [
                ("clip", ClipLoss(**kwargs)),
                ("infonce", InfoNCELoss(impl="chunked", **kwargs)),
                ("cement", CementLoss(impl="reference", **kwargs)),
                ("cement-text", CementLoss(impl="reference", **CAPTION_SEPARATION, **kwargs)),
            ]:
                i = image[rows].detach().clone().requires_grad_()
                t = text[rows].detach().clone().requires_grad_()
                h = hard[rows].detach().clone().requires_grad_()
                if name.startswith("cement"):
                    loss = loss_fn(i, t, 10.0, None, h, scores[rows], mask[rows])
                    loss.backward()
                    grad_h = h.grad
                else:
                    loss = loss_fn(i, t, torch.tensor(10.0))
                    loss.backward()
                    grad_h = None
                results[(name, local_loss, gather_with_grad)] = (loss.detach(), i.grad, t.grad, grad_h)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_clip_loss_and_single_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_worker, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=180)
        assert p.exitcode == 0
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(world)}
    image, text, hard, scores, mask = features(4 * world, 8, negatives=2, seed=3)
    for rank in range(world):
        for local_loss, gather_with_grad in [(False, False), (True, True), (False, True)]:
            clip = results[rank][("clip", local_loss, gather_with_grad)]
            infonce = results[rank][("infonce", local_loss, gather_with_grad)]
            for got, expected in zip(infonce[:3], clip[:3]):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, settings in (("cement", {}), ("cement-text", CAPTION_SEPARATION)):
        single = CementLoss(impl="reference", **settings)(image, text, 10.0, None, hard, scores, mask)
        single_grads = grads(single, image, text, hard)
        for rank in range(world):
            for local_loss, gather_with_grad in [(False, False), (False, True)]:
                # the global loss on every rank is the single-process loss
                got = results[rank][(name, local_loss, gather_with_grad)][0]
                torch.testing.assert_close(got, single.detach(), rtol=1e-5, atol=1e-6)
        # Local losses average to the global one; DDP's averaged gradients equal the single-process gradients.
        local = [results[r][(name, True, True)] for r in range(world)]
        torch.testing.assert_close(sum(x[0] for x in local) / world, single.detach(), rtol=1e-5, atol=1e-6)
        for rank in range(world):
            rows = slice(rank * 4, (rank + 1) * 4)
            # with gather_with_grad, each rank's feature gradient is summed over ranks by the all_gather backward
            torch.testing.assert_close(local[rank][1] / world, single_grads[0][rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(local[rank][2] / world, single_grads[1][rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(local[rank][3] / world, single_grads[2][rows], rtol=1e-4, atol=1e-6)


def test_margin_gate_flag_reaches_the_loss():
    import argparse

    from slipform_plugin.integration import add_arguments
    from slipform_plugin.losses import create_cement_loss

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--cement-margin-gate", "hn-accuracy"])
    loss = create_cement_loss(args)
    assert loss.margin_gate == "hn-accuracy" and loss.gate == 0.0
    assert create_cement_loss(parser.parse_args([])).margin_gate == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cement-margin-gate", "sometimes"])


def test_hard_weight_flag_reaches_the_loss_and_is_checked():
    import argparse

    from slipform_plugin.integration import add_arguments
    from slipform_plugin.losses import create_cement_loss

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert create_cement_loss(parser.parse_args(["--cement-hard-weight", "1.5"])).hard_weight == 1.5
    with pytest.raises(ValueError, match=re.escape("hard_weight must be a finite number >= 0, got -1.0")):
        CementLoss(hard_weight=-1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("hard_weight", "hard_offset"), [(0.0, None), (0.5, None), (0.5, 0.15)])
def test_hard_margin_difficulty_scales_each_concreteness_margin_by_its_pair(impl, hard_weight, hard_offset):
    """z'_ik = s x_i.h_ik + s mu_h c_ik sigmoid((x_i.h_ik - x_i.y_i + delta_h) / gamma), the factor a constant;
    delta_h is delta unless given."""
    image, text, hard, scores, mask = features(9, 12, negatives=3, seed=7)
    scale = torch.tensor(15.0, requires_grad=True)
    mu, delta, gamma = 0.3, 0.02, 0.07
    delta_h = delta if hard_offset is None else hard_offset
    loss = CementLoss(
        margin_hard=mu,
        margin_batch=0.0,
        difficulty_offset=delta,
        difficulty_temperature=gamma,
        hard_weight=hard_weight,
        hard_margin_difficulty=True,
        hard_difficulty_offset=hard_offset,
        impl=impl,
    )(image, text, scale, None, hard, scores, mask)
    with torch.no_grad():
        hard_similarity = torch.einsum("bd,bkd->bk", image, hard)
        positive = (image * text).sum(-1, keepdim=True)
        margin = 15.0 * mu * scores * torch.sigmoid((hard_similarity - positive + delta_h) / gamma)
    hard_logits = (scale * torch.einsum("bd,bkd->bk", image, hard) + margin).masked_fill(~mask, -torch.inf)
    labels = torch.arange(9)
    own_logits = torch.cat([scale * (image * text).sum(-1, keepdim=True), hard_logits], 1)
    own = F.cross_entropy(own_logits, torch.zeros(9, dtype=torch.long), reduction="none")
    expected = (
        F.cross_entropy(torch.cat([scale * image @ text.T, hard_logits], 1), labels)
        + F.cross_entropy(scale * text @ image.T, labels)
        + hard_weight * own[mask.any(1)].sum() / 9
    ) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(loss, image, text, hard, scale), grads(expected, image, text, hard, scale)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    reference = cement_loss_reference(
        image,
        text,
        scale,
        hard,
        scores,
        mask,
        margin_hard=mu,
        difficulty_offset=delta,
        difficulty_temperature=gamma,
        hard_weight=hard_weight,
        hard_margin_difficulty=True,
        hard_difficulty_offset=hard_offset,
    )
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)


def test_hard_margin_difficulty_fades_on_separated_pairs_only():
    """A negative far below the caption keeps (almost) no margin; one level with it keeps half."""
    dim = 4
    image = torch.eye(dim)[:2]
    text = torch.eye(dim)[:2]
    separated = torch.stack([torch.eye(dim)[3], torch.eye(dim)[3]])[:, None]  # cosine 0 against 1
    tied = text[:, None].clone()  # the caption itself: cosine 1 against 1
    scores, mask = torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool)

    def extra(hard: torch.Tensor, difficulty: bool) -> torch.Tensor:
        kwargs = dict(margin_batch=0.0, hard_margin_difficulty=difficulty, impl="reference")
        with_margin = CementLoss(margin_hard=0.2, **kwargs)(image, text, 10.0, None, hard, scores, mask)
        return with_margin - CementLoss(margin_hard=0.0, **kwargs)(image, text, 10.0, None, hard, scores, mask)

    assert extra(separated, difficulty=True) < 1e-6 < extra(separated, difficulty=False)
    constant, tied_difficulty = extra(tied, difficulty=False), extra(tied, difficulty=True)
    assert 0 < tied_difficulty < constant  # half the margin (sigmoid(0) = 0.5) raises the loss less


def test_hard_margin_difficulty_flag_reaches_the_loss():
    import argparse

    from slipform_plugin.integration import add_arguments
    from slipform_plugin.losses import create_cement_loss

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert create_cement_loss(parser.parse_args(["--cement-hard-margin-difficulty"])).hard_margin_difficulty
    assert not create_cement_loss(parser.parse_args([])).hard_margin_difficulty
    # delta_h follows delta unless given.
    assert create_cement_loss(parser.parse_args(["--cement-difficulty-offset", "0.05"])).hard_difficulty_offset == 0.05
    offset = ["--cement-difficulty-offset", "0.05", "--cement-hard-difficulty-offset", "0.2"]
    assert create_cement_loss(parser.parse_args(offset)).hard_difficulty_offset == 0.2
    with pytest.raises(ValueError, match=re.escape("hard_difficulty_offset must be a finite number or None, got nan")):
        CementLoss(hard_difficulty_offset=float("nan"))


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_difficulty_warmup_goes_from_the_constant_margin_to_the_scaled_one(impl):
    """w_t = max(0, 1 - t/T): the pair factor is w_t + (1 - w_t) d_ik, t counted in training-mode calls."""
    image, text, hard, scores, mask = features(7, 10, negatives=3, seed=3)
    settings = dict(margin_hard=0.3, margin_batch=0.05, hard_weight=0.5, difficulty_temperature=0.07, impl=impl)
    constant = CementLoss(**settings)(image, text, 12.0, None, hard, scores, mask)
    scaled = CementLoss(**settings, hard_margin_difficulty=True)(image, text, 12.0, None, hard, scores, mask)
    assert not torch.allclose(constant, scaled)  # the two ends of the schedule differ on these features
    with torch.no_grad():
        factor = torch.sigmoid((torch.einsum("bd,bkd->bk", image, hard) - (image * text).sum(-1, keepdim=True)) / 0.07)
    warm = CementLoss(**settings, hard_margin_difficulty=True, hard_difficulty_warmup=4)
    for step, weight in enumerate([1.0, 0.75, 0.5, 0.25, 0.0, 0.0]):
        assert warm.training_step == step and warm.difficulty_warmup_weight == pytest.approx(weight)
        loss = warm(image, text, 12.0, None, hard, scores, mask)
        blended = scores * (weight + (1 - weight) * factor)
        expected = CementLoss(**settings)(image, text, 12.0, None, hard, blended, mask)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        if step == 0:
            torch.testing.assert_close(loss, constant, rtol=1e-5, atol=1e-6)
            for g, e in zip(grads(loss, image, text, hard), grads(constant, image, text, hard)):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, scaled, rtol=1e-5, atol=1e-6)
    # Eval-mode calls do not move the clock; set_training_step does, in optimizer steps of accum_freq calls.
    warm.eval()
    warm(image, text, 12.0, None, hard, scores, mask)
    assert warm.training_step == 6
    warm.train()
    warm.set_training_step(1, calls_per_step=2)
    assert warm.training_calls == 2 and warm.difficulty_warmup_weight == pytest.approx(0.75)
    warm(image, text, 12.0, None, hard, scores, mask)
    assert warm.training_step == 1  # one of the step's two calls
    warm(image, text, 12.0, None, hard, scores, mask)
    assert warm.training_step == 2


def test_hard_difficulty_warmup_is_checked_and_reaches_the_loss():
    import argparse

    from slipform_plugin.integration import add_arguments, validate_args
    from slipform_plugin.losses import create_cement_loss

    with pytest.raises(ValueError, match=re.escape("hard_difficulty_warmup must be an integer >= 0 (training steps)")):
        CementLoss(hard_margin_difficulty=True, hard_difficulty_warmup=-1)
    with pytest.raises(ValueError, match="expected hard_margin_difficulty=True"):
        CementLoss(hard_difficulty_warmup=10)
    with pytest.raises(ValueError, match="expected step >= 0 and calls_per_step >= 1"):
        CementLoss().set_training_step(0, calls_per_step=0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--cement-hard-margin-difficulty", "--cement-hard-difficulty-warmup", "64"]
    assert create_cement_loss(parser.parse_args(flags)).hard_difficulty_warmup == 64
    assert create_cement_loss(parser.parse_args([])).hard_difficulty_warmup == 0

    recorder, errors = recording_parser()
    for bad in (["--cement-hard-difficulty-warmup", "8"], [*flags[:1], "--cement-hard-difficulty-warmup", "-2"]):
        with pytest.raises(SystemExit):
            validate_args(recorder, recorder.parse_args(["--loss", "cement", *bad]))
    validate_args(recorder, recorder.parse_args(["--loss", "cement", *flags]))  # accepted
    assert "give that flag too" in errors[0] and "must be >= 0 steps, got -2" in errors[1]


def test_train_one_epoch_sets_the_loss_schedule_to_openclips_step():
    """A resumed run continues the warm-up: epoch e starts at step e * (num_batches // accum_freq)."""
    from types import SimpleNamespace

    from slipform_plugin.integration import wrap_train_one_epoch

    seen = []
    wrapped = wrap_train_one_epoch(lambda model, data, loss, *_: seen.append((loss.training_step, loss.calls_per_step)))
    loss = CementLoss(hard_margin_difficulty=True, hard_difficulty_warmup=100)
    data = {"train": SimpleNamespace(dataloader=SimpleNamespace(num_batches=30))}
    args = SimpleNamespace(accum_freq=2, rank=0, local_rank=0, world_size=1, distributed=False)
    wrapped(None, data, loss, 3, None, None, None, None, args)
    assert seen == [(45, 2)] and loss.difficulty_warmup_weight == pytest.approx(0.55)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("difficulty", [False, True])
def test_separate_hard_columns_leave_the_in_batch_rows_to_clip(impl, difficulty):
    """hard_columns="separate": loss = (CLIP rows and columns + lambda sum_i H_i) / (2B); negatives in H_i only."""
    image, text, hard, scores, mask = features(9, 12, negatives=3, seed=11)
    mask[0] = False  # a row without real negatives contributes no H_i
    scale = torch.tensor(15.0, requires_grad=True)
    mu, lam = 0.3, 0.75
    loss = CementLoss(
        margin_hard=mu,
        margin_batch=0.0,
        hard_weight=lam,
        hard_columns="separate",
        hard_margin_difficulty=difficulty,
        impl=impl,
    )(image, text, scale, None, hard, scores, mask)
    with torch.no_grad():
        hard_similarity = torch.einsum("bd,bkd->bk", image, hard)
        factor = torch.sigmoid((hard_similarity - (image * text).sum(-1, keepdim=True)) / 0.05) if difficulty else 1.0
        margin = 15.0 * mu * scores * factor
    hard_logits = (scale * torch.einsum("bd,bkd->bk", image, hard) + margin).masked_fill(~mask, -torch.inf)
    own_logits = torch.cat([scale * (image * text).sum(-1, keepdim=True), hard_logits], 1)
    own = F.cross_entropy(own_logits, torch.zeros(9, dtype=torch.long), reduction="none")
    expected = clip_plus_hard_term(image, text, scale, lam * own[mask.any(1)].sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(loss, image, text, hard, scale), grads(expected, image, text, hard, scale)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # With the difficulty margin on, the in-batch part is Cement without hard negatives.
    settings = dict(margin_hard=mu, margin_batch=0.1, hard_weight=lam, hard_margin_difficulty=difficulty, impl=impl)
    with_batch = CementLoss(**settings, hard_columns="separate")(image, text, scale, None, hard, scores, mask)
    in_batch = CementLoss(**settings)(image, text, scale)
    assert not torch.allclose(in_batch, loss - lam * own[mask.any(1)].sum() / 18)  # mu_b changes the in-batch part
    torch.testing.assert_close(
        with_batch - in_batch,
        lam * own[mask.any(1)].sum() / 18,
        rtol=1e-5,
        atol=1e-5,
    )


def test_hard_columns_are_checked_and_reach_the_loss():
    import argparse

    from slipform_plugin.integration import add_arguments, validate_args
    from slipform_plugin.losses import create_cement_loss

    with pytest.raises(ValueError, match=re.escape("hard_columns must be one of ('joint', 'separate'), got 'own'")):
        CementLoss(hard_columns="own")
    with pytest.raises(ValueError, match=re.escape("expected hard_weight > 0 (got 0.0)")):
        CementLoss(hard_columns="separate")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--cement-hard-columns", "separate", "--cement-hard-weight", "0.5"]
    assert create_cement_loss(parser.parse_args(flags)).hard_columns == "separate"
    assert create_cement_loss(parser.parse_args([])).hard_columns == "joint"

    recorder, errors = recording_parser()
    with pytest.raises(SystemExit):
        validate_args(recorder, recorder.parse_args(["--loss", "cement", *flags[:2]]))
    assert "expected --cement-hard-weight > 0, got 0.0" in errors[0]
    validate_args(recorder, recorder.parse_args(["--loss", "cement", *flags]))  # accepted


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("hard_columns", "hard_weight", "difficulty"), [("joint", 0.0, False), ("separate", 1.0, True)]
)
def test_caption_separation_term_adds_the_text_side_hinge(impl, hard_columns, hard_weight, difficulty):
    """text_weight: loss += lambda_t s sum_ik v_ik max(0, y_i.h_ik - (1 - mu_t c_ik)) / (2B), with the raw c_ik."""
    image, text, _, scores, mask = features(7, 10, negatives=3, seed=21, requires_grad=False)
    generator = torch.Generator().manual_seed(22)
    # Negatives near their captions (like swaps, cosine about 0.9 to 1), so that most hinges are active.
    noise = torch.randn(7, 3, 10, generator=generator) * torch.tensor([0.05, 0.3, 2.0])[None, :, None]
    hard = F.normalize(text[:, None] + noise, dim=-1).requires_grad_()
    image, text = image.requires_grad_(), text.requires_grad_()
    mask[0] = False
    scale = torch.tensor(12.0, requires_grad=True)
    lam_t, mu_t = 1.5, 0.3
    settings = dict(
        margin_hard=0.2,
        margin_batch=0.1,
        hard_weight=hard_weight,
        hard_columns=hard_columns,
        hard_margin_difficulty=difficulty,
        impl=impl,
    )
    args = (image, text, scale, None, hard, scores, mask)
    loss = CementLoss(**settings, text_weight=lam_t, text_margin=mu_t)(*args)
    base = CementLoss(**settings)(*args)
    cosine = torch.einsum("bd,bkd->bk", text, hard)
    excess = torch.relu(cosine - (1 - mu_t * scores)).masked_fill(~mask, 0.0)
    active = int((excess > 0).sum())
    assert 0 < active < int(mask.sum())  # some hinges on, some off: the test sees both sides
    expected = base + lam_t * scale.detach() * excess.sum() / (2 * 7)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads(loss, image, text, hard, scale), grads(expected, image, text, hard, scale)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # The term's own gradient, by hand: d/dy_i = c sum_k a_ik h_ik, d/dh_ik = c a_ik y_i, c = lam_t s / (2B).
    term = CementLoss(**settings, text_weight=lam_t, text_margin=mu_t)(*args) - CementLoss(**settings)(*args)
    on = (excess > 0).float()
    coefficient = lam_t * 12.0 / 14
    grad_text, grad_hard, grad_scale = grads(term, text, hard, scale)
    torch.testing.assert_close(
        grad_text, coefficient * torch.einsum("bk,bkd->bd", on, hard.detach()), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(grad_hard, coefficient * on[..., None] * text.detach()[:, None], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_scale, torch.zeros(()), atol=1e-5, rtol=0)  # s is detached in the term


def test_caption_separation_term_is_zero_for_separated_or_masked_negatives():
    image, text, _, scores, mask = features(5, 6, negatives=2, seed=3, requires_grad=False)
    far = F.normalize(-text[:, None].expand(5, 2, 6).clone(), dim=-1)  # cosine -1: below every threshold
    near = text[:, None].expand(5, 2, 6).clone()  # cosine 1: above every threshold with a score > 0
    plain = CementLoss(impl="reference")
    with_term = CementLoss(impl="reference", text_weight=3.0, text_margin=0.5)
    scores = scores.clamp_min(0.1)
    for hard, expected_zero in ((far, True), (near, False)):
        extra = with_term(image, text, 10.0, None, hard, scores, mask) - plain(
            image, text, 10.0, None, hard, scores, mask
        )
        assert (abs(float(extra)) < 1e-6) == expected_zero
    none_real = torch.zeros_like(mask)
    extra = with_term(image, text, 10.0, None, near, scores, none_real) - plain(
        image, text, 10.0, None, near, scores, none_real
    )
    assert abs(float(extra)) < 1e-6
    # Without hard negatives the term is absent and the loss is CLIP's.
    torch.testing.assert_close(with_term(image, text, 10.0), plain(image, text, 10.0))


def test_caption_separation_settings_are_checked_and_reach_the_loss():
    import argparse

    from slipform_plugin.integration import add_arguments, validate_args
    from slipform_plugin.losses import create_cement_loss

    with pytest.raises(ValueError, match=re.escape("text_weight must be a finite number >= 0, got -1")):
        CementLoss(text_weight=-1)
    with pytest.raises(ValueError, match=re.escape("text_margin must be in [0, 2] (a cosine separation), got 2.5")):
        CementLoss(text_margin=2.5)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    loss = create_cement_loss(parser.parse_args(["--cement-text-weight", "0.5", "--cement-text-margin", "0.4"]))
    assert (loss.text_weight, loss.text_margin) == (0.5, 0.4)
    assert create_cement_loss(parser.parse_args([])).text_weight == 0.0

    recorder, errors = recording_parser()
    for flags, message in (
        (["--cement-text-weight", "nan"], "--cement-text-weight must be a finite number >= 0, got nan"),
        (["--cement-text-margin", "-0.1"], "--cement-text-margin must be in [0, 2] (a cosine separation), got -0.1"),
    ):
        with pytest.raises(SystemExit):
            validate_args(recorder, recorder.parse_args(["--loss", "cement", *flags]))
        assert message in errors[-1]


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_unit_difference_divides_each_hard_gap_by_the_captions_distance(impl):
    """hard_unit_difference=eps: H_i = log(1 + sum_k exp(s x.(h - y) / max(|h - y|, eps) + margin)), norm detached."""
    image, text, _, scores, mask = features(8, 10, negatives=3, seed=31, requires_grad=False)
    generator = torch.Generator().manual_seed(32)
    noise = torch.randn(8, 3, 10, generator=generator) * torch.tensor([0.01, 0.2, 1.0])[None, :, None]
    hard = F.normalize(text[:, None] + noise, dim=-1).requires_grad_()  # distances below and above the floor
    image, text = image.requires_grad_(), text.requires_grad_()
    mask[1] = False
    scale = torch.tensor(14.0, requires_grad=True)
    eps, mu, lam = 0.1, 0.2, 1.0
    loss = CementLoss(
        margin_hard=mu, margin_batch=0.0, hard_weight=lam, hard_columns="separate", hard_unit_difference=eps, impl=impl
    )(image, text, scale, None, hard, scores, mask)
    distance = (hard - text[:, None]).norm(dim=-1).detach()
    assert (distance < eps).any() and (distance > eps).any()
    gap = torch.einsum("bd,bkd->bk", image, hard) - (image * text).sum(-1, keepdim=True)
    logits = (scale * gap / distance.clamp_min(eps) + 14.0 * mu * scores).masked_fill(~mask, -torch.inf)
    own = torch.logsumexp(torch.cat([torch.zeros(8, 1), logits], 1), 1)
    expected = clip_plus_hard_term(image, text, scale, lam * own[mask.any(1)].sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads(loss, image, text, hard, scale), grads(expected, image, text, hard, scale)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    # Where every hard negative is exactly a unit away from its caption, the term is the plain H_i.
    unit_text = torch.eye(10)[:8]
    unit_hard = 0.5 * unit_text[:, None] + 3**0.5 / 2 * torch.eye(10)[[(i + 1) % 10 for i in range(8)]][:, None]
    torch.testing.assert_close((unit_hard - unit_text[:, None]).norm(dim=-1), torch.ones(8, 1))
    settings = dict(margin_hard=mu, margin_batch=0.0, hard_weight=lam, hard_columns="separate", impl=impl)
    args = (image.detach(), unit_text, 14.0, None, unit_hard, scores[:, :1])
    unit_loss = CementLoss(**settings, hard_unit_difference=eps)(*args)
    torch.testing.assert_close(unit_loss, CementLoss(**settings)(*args), rtol=1e-5, atol=1e-6)


def test_hard_unit_difference_is_checked_and_reaches_the_loss():
    import argparse

    from slipform_plugin.integration import add_arguments, validate_args
    from slipform_plugin.losses import create_cement_loss

    with pytest.raises(ValueError, match=re.escape("hard_unit_difference must be None or a floor in (0, 2], got 0")):
        CementLoss(hard_columns="separate", hard_weight=1.0, hard_unit_difference=0)
    with pytest.raises(ValueError, match=re.escape("expected hard_columns='separate' (got 'joint')")):
        CementLoss(hard_weight=1.0, hard_unit_difference=0.1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--cement-hard-columns", "separate", "--cement-hard-weight", "1", "--cement-hard-unit-difference", "0.25"]
    assert create_cement_loss(parser.parse_args(flags)).hard_unit_difference == 0.25
    assert create_cement_loss(parser.parse_args([])).hard_unit_difference is None

    recorder, errors = recording_parser()
    with pytest.raises(SystemExit):
        validate_args(recorder, recorder.parse_args(["--loss", "cement", "--cement-hard-unit-difference", "0.25"]))
    assert "expected --cement-hard-columns separate, got joint" in errors[-1]
    validate_args(recorder, recorder.parse_args(["--loss", "cement", *flags]))  # accepted


def test_the_model_hands_the_kinds_only_to_losses_that_declare_them():
    """``hn_kinds`` reaches the loss only while ``train_one_epoch`` runs a loss with
    ``accepts_hard_negative_kinds``: a third-party loss written to the older contract gets no new argument."""
    from types import SimpleNamespace

    from slipform_plugin.hard_negatives import HardNegative
    from slipform_plugin.integration import forward_with_negatives, wrap_train_one_epoch
    from slipform_plugin.packing import pack_caption_tokens

    negatives = [HardNegative("b", "swap_objects", 0.5, (0, 1)), HardNegative("c", "replace_object", 0.25, (0, 1))]
    packed = torch.stack([pack_caption_tokens(torch.arange(9).view(3, 3), negatives, 3)] * 2)  # [2, 4, 6]

    def encode(model, image, tokens):
        return {"image_features": image, "text_features": tokens.float(), "logit_scale": torch.tensor(1.0)}

    class Model(torch.nn.Module):
        pass

    class OlderLoss(torch.nn.Module):  # meters its accuracy, so the wrapper does run around it
        accepts_hard_negatives = True

        def __init__(self) -> None:
            super().__init__()
            self.hard_negative_meter = HardNegativeMeter()

    outputs = []

    def train_one_epoch(wrapped_model, data, loss, *_):  # DDP calls the inner CLIP module's (patched) forward
        outputs.append(forward_with_negatives(encode, wrapped_model.module, torch.zeros(2, 3), packed))

    model = Model()
    ddp_like = SimpleNamespace(module=model)
    args = SimpleNamespace(accum_freq=1, rank=0, local_rank=0, world_size=1, distributed=False)
    wrapped = wrap_train_one_epoch(train_one_epoch)
    data = {"train": SimpleNamespace(dataloader=SimpleNamespace(num_batches=4))}
    wrapped(ddp_like, data, CementLoss(), 0, None, None, None, None, args)
    wrapped(ddp_like, data, OlderLoss(), 0, None, None, None, None, args)
    with_kinds, without_kinds = outputs
    torch.testing.assert_close(with_kinds["hn_kinds"], torch.tensor([[5, 0, -1]] * 2))
    assert "hn_kinds" not in without_kinds and set(without_kinds) == set(with_kinds) - {"hn_kinds"}
    torch.testing.assert_close(with_kinds["hn_mask"], torch.tensor([[True, True, False]] * 2))
    assert not getattr(model, "_slipform_hn_kinds", False)  # restored after the epoch
