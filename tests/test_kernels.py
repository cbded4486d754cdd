"""The chunked and Triton Cement-loss paths against the full-matrix reference (and OpenCLIP's ClipLoss).

Triton kernels run under the interpreter on CPU: ``TRITON_INTERPRET=1`` must be set before
``slipform_plugin.kernels.triton_cement`` is imported (triton reads it when the kernels are decorated), so it is
set at the top of this module, before anything imports that file. Shapes stay tiny: the interpreter is about
1000 times slower than torch.

``SLIPFORM_KERNEL_TEST_DEVICE=cuda`` runs the reference comparisons (``-k matches_reference``) on a GPU with the
compiled kernels instead, as ``.ci/device-check`` does; the other tests assume the CPU default.
"""

from __future__ import annotations

import math
import os
import re

# interpreted on the CPU default; compiled (TRITON_INTERPRET=0) with SLIPFORM_KERNEL_TEST_DEVICE=cuda
os.environ["TRITON_INTERPRET"] = "1" if os.environ.get("SLIPFORM_KERNEL_TEST_DEVICE", "cpu") == "cpu" else "0"

import subprocess
import sys

import pytest
import slipform_plugin.kernels.chunked as chunked
import torch
import torch.nn.functional as F
from slipform_plugin.kernels import available_impls, cement_loss, resolve_impl
from slipform_plugin.kernels.chunked import TileConfig, TiledLSE

from slipform_plugin.losses.reference import cement_loss_reference

#: where make_inputs puts its tensors: "cpu" (the default, Triton interpreted) or "cuda" (compiled kernels)
DEVICE = os.environ.get("SLIPFORM_KERNEL_TEST_DEVICE", "cpu")

triton_interpreted = pytest.mark.skipif(
    "triton" not in available_impls(DEVICE), reason=f"triton cannot run on {DEVICE} here (the interpreter needs it)"
)

#: Per-dtype tolerances (atol, rtol relative to the reference's largest magnitude).
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(autouse=True)
def small_chunk_tiles(monkeypatch):
    """Tiny chunked tiles (8 x 16) so that every test shape has several ragged tiles."""
    monkeypatch.setattr(chunked, "DEFAULT_BLOCK_ROWS", 8)
    monkeypatch.setattr(chunked, "DEFAULT_BLOCK_COLS", 16)


def make_inputs(num_total, dim, num_hard, local_size, dtype, seed, *, scale=10.0):
    generator = torch.Generator().manual_seed(seed)

    def features(*shape):
        drawn = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return F.normalize(drawn, dim=-1).to(device=DEVICE, dtype=dtype)

    inputs = {
        "image_features": features(num_total, dim).requires_grad_(),
        "text_features": features(num_total, dim).requires_grad_(),
        "logit_scale": torch.tensor(float(scale), device=DEVICE).requires_grad_(),
    }
    if num_hard:
        inputs["hn_text_features"] = features(local_size, num_hard, dim).requires_grad_()
        inputs["hn_scores"] = torch.rand(local_size, num_hard, generator=generator).to(DEVICE)
        mask = torch.rand(local_size, num_hard, generator=generator) > 0.35
        mask[0] = False  # one row with every negative masked out
        inputs["hn_mask"] = mask.to(DEVICE)
    return inputs


def loss_and_grads(fn, inputs, grad_output=2.0, **kwargs):
    """Loss and the gradients of every differentiable input, after ``backward(grad_output)``."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            value.grad = None
    loss = fn(**inputs, **kwargs)
    loss.backward(torch.tensor(grad_output, device=loss.device))
    grads = {name: value.grad.clone() for name, value in inputs.items() if getattr(value, "requires_grad", False)}
    return loss.detach().clone(), grads


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCE[dtype]
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


CASES = [
    # (M, D, K, scale, margins, local_start, local_size, dtype)
    pytest.param(1, 3, 0, 1.0, False, 0, None, torch.float32, id="N1"),
    pytest.param(1, 4, 2, 20.0, True, 0, None, torch.float32, id="N1-hard"),
    pytest.param(37, 7, 0, 100.0, False, 0, None, torch.float32, id="ragged-oddD-s100"),
    pytest.param(37, 7, 4, 100.0, True, 0, None, torch.float32, id="K4-margins-s100"),
    pytest.param(23, 5, 1, 1.0, True, 0, None, torch.float32, id="K1-s1"),
    pytest.param(29, 9, 3, 30.0, True, 0, None, torch.float32, id="K3-margins"),
    pytest.param(40, 6, 2, 50.0, True, 10, 17, torch.float32, id="local-slice-margins"),
    pytest.param(33, 8, 0, 10.0, False, 32, 1, torch.float32, id="local-last-row"),
    pytest.param(29, 8, 2, 20.0, True, 0, None, torch.bfloat16, id="bf16"),
    pytest.param(29, 8, 2, 20.0, True, 3, 11, torch.float16, id="fp16-local"),
]


def _case_kwargs(margins, local_start, local_size):
    kwargs = {"local_start": local_start, "local_size": local_size, "difficulty_temperature": 0.1}
    if margins:
        kwargs.update(margin_batch=0.3, margin_hard=0.2, difficulty_offset=0.1, hard_weight=0.7)
    return kwargs


def _check_against_reference(
    impl, num_total, dim, num_hard, scale, margins, local_start, local_size, dtype, *, grad_output
):
    size = num_total - local_start if local_size is None else local_size
    inputs = make_inputs(num_total, dim, num_hard, size, dtype, seed=num_total * 31 + dim, scale=scale)
    kwargs = _case_kwargs(margins, local_start, local_size)
    expected_loss, expected = loss_and_grads(cement_loss_reference, inputs, grad_output, **kwargs)
    loss, grads = loss_and_grads(cement_loss, inputs, grad_output, impl=impl, **kwargs)
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, dtype, "loss")
    assert grads.keys() == expected.keys()
    for name in expected:
        assert grads[name].dtype == expected[name].dtype, name
        assert_close(grads[name], expected[name], dtype, f"d loss / d {name}")
    if num_hard and "hn_text_features" in grads:
        # Masked negatives get exactly zero gradient.
        assert torch.all(grads["hn_text_features"][~inputs["hn_mask"]] == 0)


@pytest.mark.parametrize(
    ("num_total", "dim", "num_hard", "scale", "margins", "local_start", "local_size", "dtype"), CASES
)
def test_chunked_matches_reference(num_total, dim, num_hard, scale, margins, local_start, local_size, dtype):
    _check_against_reference(
        "chunked", num_total, dim, num_hard, scale, margins, local_start, local_size, dtype, grad_output=2.0
    )


@triton_interpreted
@pytest.mark.parametrize(
    ("num_total", "dim", "num_hard", "scale", "margins", "local_start", "local_size", "dtype"), CASES
)
def test_triton_matches_reference(num_total, dim, num_hard, scale, margins, local_start, local_size, dtype):
    _check_against_reference(
        "triton", num_total, dim, num_hard, scale, margins, local_start, local_size, dtype, grad_output=2.0
    )


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=triton_interpreted)])
def test_negative_grad_output(impl):
    """A negative upstream gradient flips every gradient (exercises the sign folding in backward)."""
    _check_against_reference(impl, 21, 6, 2, 15.0, True, 0, None, torch.float32, grad_output=-0.5)


@pytest.mark.parametrize("impl", ["reference", "chunked", pytest.param("triton", marks=triton_interpreted)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_equals_openclip_clip_loss(impl, scale):
    """Margins off and K = 0: exactly OpenCLIP's ClipLoss, value and gradients."""
    from open_clip.loss import ClipLoss

    inputs = make_inputs(26, 8, 0, 26, torch.float32, seed=5, scale=scale)
    expected_loss, expected = loss_and_grads(ClipLoss(), inputs)
    loss, grads = loss_and_grads(cement_loss, inputs, impl=impl)
    assert_close(loss, expected_loss, torch.float32, "loss")
    for name in expected:
        assert_close(grads[name], expected[name], torch.float32, f"d loss / d {name}")


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=triton_interpreted)])
def test_logit_bias_cancels_and_gets_zero_gradient(impl):
    inputs = make_inputs(17, 5, 2, 17, torch.float32, seed=3)
    bias = torch.tensor(-7.5, requires_grad=True)
    expected = cement_loss_reference(**inputs, logit_bias=bias, margin_batch=0.2)
    loss = cement_loss(**inputs, logit_bias=bias, margin_batch=0.2, impl=impl)
    assert_close(loss.detach(), expected.detach(), torch.float32, "loss")
    loss.backward()
    assert bias.grad is not None and bias.grad.item() == 0.0


def test_margins_change_the_loss():
    """Guards the tests above against margins that are silently ignored."""
    inputs = make_inputs(19, 6, 2, 19, torch.float32, seed=11)
    plain = cement_loss(**inputs, impl="chunked")
    with_margins = cement_loss(**inputs, impl="chunked", margin_batch=0.3, margin_hard=0.3)
    assert with_margins.item() > plain.item() + 1e-3


def test_tiled_lse_mixed_sign_gradients():
    """TiledLSE.backward with arbitrary output gradients (the explicit-multiply path) against autograd."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(19, 5, generator=generator, requires_grad=True)
    b = torch.randn(19, 5, generator=generator, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    weights = [torch.randn(19, generator=generator) for _ in range(3)]
    cfg = TileConfig(want_cols=True, margin_batch=0.4, offset=0.1, temperature=0.2, block_rows=4, block_cols=8)
    outputs = TiledLSE.apply(a, b, scale, cfg)
    sum(output @ weight for output, weight in zip(outputs, weights)).backward()
    got = [a.grad.clone(), b.grad.clone(), scale.grad.clone()]
    a.grad = b.grad = scale.grad = None
    sim = a @ b.T
    positives = sim.diagonal()
    with torch.no_grad():
        eye = torch.eye(19, dtype=torch.bool)
        row_margin = (3.0 * 0.4 * torch.sigmoid((sim - positives[:, None] + 0.1) / 0.2)).masked_fill(eye, 0)
        col_margin = (3.0 * 0.4 * torch.sigmoid((sim - positives[None, :] + 0.1) / 0.2)).masked_fill(eye, 0)
    expected = [
        torch.logsumexp(scale * sim + row_margin, dim=1),
        torch.logsumexp(scale * sim + col_margin, dim=0),
        scale * positives,
    ]
    for output, want in zip(outputs, expected):
        torch.testing.assert_close(output, want.detach(), rtol=1e-5, atol=1e-5)
    sum(output @ weight for output, weight in zip(expected, weights)).backward()
    for actual, want in zip(got, [a.grad, b.grad, scale.grad]):
        torch.testing.assert_close(actual, want, rtol=1e-4, atol=1e-5)


def test_chunked_never_allocates_the_full_matrix(monkeypatch):
    """With 64 x 64 tiles at M = 1024, no op allocates M^2 / 16 floats (the full matrix is M^2 floats)."""
    monkeypatch.setattr(chunked, "DEFAULT_BLOCK_ROWS", 64)
    monkeypatch.setattr(chunked, "DEFAULT_BLOCK_COLS", 64)
    inputs = make_inputs(1024, 8, 2, 1024, torch.float32, seed=2)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = cement_loss(**inputs, margin_batch=0.2, impl="chunked")
        loss.backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < 1024 * 1024 * 4 / 16, f"largest allocation {largest} bytes"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cement_loss(**inputs, impl="reference").backward()
    # The same probe sees the reference's full matrix (so the bound above can fail).
    assert max(event.cpu_memory_usage for event in prof.events()) >= 1024 * 1024 * 4


BAD_INPUTS = [
    ("nan-image", lambda i: i["image_features"].data.__setitem__((1, 2), float("nan")), ValueError, "image_features"),
    ("inf-text", lambda i: i["text_features"].data.__setitem__((0, 0), float("inf")), ValueError, "text_features"),
    ("nan-hard", lambda i: i["hn_text_features"].data.__setitem__((0, 0, 0), float("nan")), ValueError, "hn_text"),
    (
        "shape",
        lambda i: i.update(text_features=i["text_features"][:-1]),
        ValueError,
        "text_features: expected the shape",
    ),
    ("dtype", lambda i: i.update(text_features=i["text_features"].double()), ValueError, "expected dtype"),
    (
        "hard-shape",
        lambda i: i.update(hn_text_features=i["hn_text_features"][:, :, :-1]),
        ValueError,
        "hn_text_features",
    ),
    (
        "scores-range",
        lambda i: i["hn_scores"].__setitem__((1, 0), 1.5),
        ValueError,
        r"hn_scores: expected values in \[0, 1\], got min .*, max 1.5",
    ),
    ("mask-dtype", lambda i: i.update(hn_mask=i["hn_mask"].float()), ValueError, "hn_mask: expected dtype"),
    ("scale-zero", lambda i: i.update(logit_scale=torch.tensor(0.0)), ValueError, "logit_scale: expected"),
    ("scale-negative", lambda i: i.update(logit_scale=-2.0), ValueError, "logit_scale: expected"),
    ("scale-vector", lambda i: i.update(logit_scale=torch.ones(2)), ValueError, "logit_scale: expected a scalar"),
    ("not-tensor", lambda i: i.update(image_features=[[1.0]]), TypeError, "image_features: expected a torch.Tensor"),
    ("one-dim", lambda i: i.update(image_features=i["image_features"][0]), ValueError, "expected a 2-D tensor"),
]


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize(("name", "corrupt", "error", "message"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise(impl, name, corrupt, error, message):
    inputs = make_inputs(6, 4, 2, 6, torch.float32, seed=1)
    corrupt(inputs)
    with pytest.raises(error, match=message):
        cement_loss(**inputs, impl=impl)


def test_bad_settings_raise():
    inputs = make_inputs(6, 4, 0, 6, torch.float32, seed=1)
    empty = {**inputs, "image_features": torch.zeros(0, 4), "text_features": torch.zeros(0, 4)}
    with pytest.raises(ValueError, match="expected a non-empty batch"):
        cement_loss(**empty)
    with pytest.raises(ValueError, match="local_size: expected"):
        cement_loss(**inputs, local_start=4, local_size=3)
    with pytest.raises(ValueError, match="local_start: expected"):
        cement_loss(**inputs, local_start=6)
    with pytest.raises(ValueError, match="difficulty_temperature: expected"):
        cement_loss(**inputs, difficulty_temperature=0.0)
    with pytest.raises(ValueError, match="impl: expected one of"):
        cement_loss(**inputs, impl="cuda")
    with pytest.raises(ValueError, match="hn_text_features: expected"):
        cement_loss(**inputs, hn_mask=torch.ones(6, 2, dtype=torch.bool))


def test_check_finite_can_be_switched_off():
    inputs = make_inputs(6, 4, 0, 6, torch.float32, seed=1)
    inputs["image_features"].data[0, 0] = float("nan")
    loss = cement_loss(**inputs, impl="chunked", check_finite=False)
    assert torch.isnan(loss)


def test_impl_resolution(monkeypatch):
    assert resolve_impl("auto", "cpu") == "chunked"
    assert resolve_impl("chunked", "cpu") == "chunked"
    assert resolve_impl("reference", "cpu") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="impl='triton': expected CUDA tensors"):
        resolve_impl("triton", "cpu")
    assert "triton" not in available_impls("cpu")


def test_import_is_cheap():
    """Importing the package neither imports triton nor initialises CUDA."""
    code = (
        "import sys, torch, slipform_plugin.kernels as k; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'cuda initialised'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_bench_loss_writes_csv_and_plot(tmp_path):
    """``slipform bench-loss`` end to end at a toy size: table rows, CSV with every impl, a PNG."""
    import csv

    from slipform_plugin.cli import main

    out = tmp_path / "bench"
    code = main(
        ["bench-loss", "--sizes", "96", "--dim", "8", "--impls", "clip,chunked", "--repeats", "1", "--out", str(out)]
    )
    assert code == 0
    with open(out / "bench_loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["impl"] for row in rows] == ["clip", "chunked"]
    for row in rows:
        assert float(row["seconds"]) > 0 and float(row["gflops"]) > 0 and float(row["matmul_gflops"]) > 0
    assert (out / "bench_loss.png").stat().st_size > 1000


def test_bench_loss_margins_both_side_by_side(tmp_path, capsys):
    """``--margins both --hn-num K``: rows IMPL and IMPL+margins on the same inputs, finite numbers, the ratio."""
    import csv

    import slipform_plugin.kernels.bench as bench

    from slipform_plugin.cli import main

    out = tmp_path / "bench"
    argv = ["bench-loss", "--sizes", "64", "--dim", "8", "--impls", "clip,chunked", "--repeats", "1"]
    argv += ["--margins", "both", "--margin-hard", "0.1", "--margin-batch", "0.05", "--hn-num", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    with open(out / "bench_loss.csv") as handle:
        rows = {row["impl"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["clip", "chunked", "chunked+margins"]
    for row in rows.values():
        for key in ("seconds", "gflops", "peak_mib", "matmul_gflops"):
            assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (key, row)
        assert float(row["seconds"]) > 0 and float(row["gflops"]) > 0
    assert (rows["chunked"]["hn_num"], rows["chunked+margins"]["hn_num"], rows["clip"]["hn_num"]) == ("3", "3", "0")
    assert float(rows["chunked"]["margin_batch"]) == 0.0 and float(rows["chunked+margins"]["margin_batch"]) == 0.05
    assert float(rows["chunked+margins"]["margin_hard"]) == 0.1
    assert rows["clip"]["note"] == "without hard negatives"
    # FLOPs: 8 N (N + K) D for our paths (the K columns counted), 8 N^2 D for ClipLoss.
    assert bench._flops("chunked", 64, 8, 3) == 8 * 64 * (64 + 3) * 8
    assert bench._flops("clip", 64, 8, 3) == 8 * 64 * 64 * 8
    printed = capsys.readouterr().out
    assert re.search(r"chunked\+margins +N=64 +memory on/off = [\d.]+x, time on/off = [\d.]+", printed), printed
