"""Slipform's flags inside OpenCLIP's own parser, loss creation, the model's hard-negative forward, the
version guard and the abbreviation trap."""

from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import open_clip_train.params as params
import pytest
import torch

from slipform_plugin import integration
from slipform_plugin.hard_negatives import HardNegative
from slipform_plugin.losses import CementLoss, InfoNCELoss
from slipform_plugin.packing import pack_caption_tokens


def parse(*argv: str):
    return params.parse_args(list(argv))


def parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


def test_defaults_leave_openclip_alone():
    args = parse()
    assert (args.loss, args.hn, args.hn_num, args.loss_impl) == ("clip", "none", 3, "auto")
    assert args.loss_dist_impl is None
    assert args.hn_seed == args.seed  # the generator follows --seed unless told otherwise


def test_slipform_flags_parse_exactly():
    args = parse("--loss", "cement", "--hn", "concreteplant", "--hn-num", "4", "--cement-margin-hard", "0.3")
    assert (args.loss, args.hn, args.hn_num, args.cement_margin_hard) == ("cement", "concreteplant", 4, 0.3)
    # The abbreviation trap: without the plugin argparse would read --loss cement as --loss-dist-impl cement.
    assert args.loss_dist_impl is None


def test_without_plugin_the_abbreviation_trap_is_real():
    """Documents why the end-to-end tests check the plugin's log lines: stock OpenCLIP swallows --loss."""
    code = "import open_clip_train.params as p; a = p.parse_args(['--loss', 'cement']); print(a.loss_dist_impl)"
    env = {**os.environ, "SLIPFORM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "cement"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--loss", "focal"), "--loss: unknown loss 'focal'; registered losses are cement, clip, infonce"),
        (("--loss", "cement", "--hn", "llm"), "--hn: unknown hard-negative generator 'llm'; registered generators"),
        (("--hn", "concreteplant"), "--hn concreteplant needs a loss that uses hard negatives, but --loss is 'clip'"),
        (("--loss", "cement", "--hn-num", "-1"), "argument --hn-num: expected an integer in [0, 64], got -1"),
        (("--loss", "cement", "--hn-num", "100000"), "argument --hn-num: expected an integer in [0, 64], got 100000"),
        (("--loss", "cement", "--siglip"), "--loss cement cannot be combined with --siglip"),
        (("--loss", "cement", "--cement-difficulty-temperature", "0"), "--cement-difficulty-temperature must be > 0"),
        (("--loss", "cement", "--cement-hard-weight", "-1"), "--cement-hard-weight must be a finite number >= 0"),
        (("--loss", "cement", "--hn", "concreteplant", "--hn-kinds", "rhyme"), "--hn-kinds: unknown kinds ['rhyme']"),
        (("--loss", "cement", "--loss-impl", "cuda"), "argument --loss-impl: invalid choice: 'cuda'"),
        (("--loss", "cement", "--hn", "concreteplant", "--dataset-type", "csv"), "needs WebDataset training data"),
        (("--loss", "cement", "--hn", "concreteplant", "--train-data", "x.csv"), "needs WebDataset training data"),
        (("--loss", "infonce", "--hn", "concreteplant", "--model", "coca_ViT-B-32"), "supports CLIP-style models"),
    ],
)
def test_bad_flags_get_clear_errors(capsys, argv, message):
    assert message in parse_error(capsys, *argv)


def test_unsupported_openclip_version(monkeypatch, capsys):
    monkeypatch.setattr(integration, "openclip_version", lambda: "4.1.0")
    err = parse_error(capsys, "--loss", "cement")
    assert "Slipform supports open_clip_torch >=3.0,<4, found 4.1.0" in err
    assert "loss" in err
    assert parse().loss == "clip"  # without Slipform flags the run goes on as OpenCLIP's


def test_unsupported_version_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(integration, "openclip_version", lambda: "2.9.0")
    integration._patch_open_clip(open_clip)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == [
        "slipform: warning: Slipform supports open_clip_torch >=3.0,<4, found 2.9.0; install a supported version "
        "(pip install 'open_clip_torch[training]>=3.0,<4'); the plugin stays inactive"
    ]


def parse_as_main(*argv: str):
    """Parse like ``open_clip_train.main`` does, including the attributes it sets afterwards."""
    args = parse(*argv)
    args.distill = args.distill_model is not None and args.distill_pretrained is not None
    args.rank, args.world_size = 0, 1
    return args


def test_create_loss_dispatches_on_the_flag():
    base = ["--local-loss", "--gather-with-grad"]
    parse = parse_as_main
    clip = open_clip.create_loss(parse(*base))
    assert type(clip) is open_clip.ClipLoss
    cement = open_clip.create_loss(parse(*base, "--loss", "cement", "--cement-margin-batch", "0.2"))
    assert isinstance(cement, CementLoss) and cement.margin_batch == 0.2 and cement.local_loss
    infonce = open_clip.create_loss(parse("--loss", "infonce", "--loss-impl", "reference"))
    assert isinstance(infonce, InfoNCELoss) and infonce.margin_hard == 0.0 and infonce.impl == "reference"


@pytest.mark.parametrize(
    ("name", "tower"),
    [
        ("slipform-tiny", "VisionTransformer"),
        ("slipform-micro", "VisionTransformer"),
        ("slipform-micro-cnn", "ModifiedResNet"),
    ],
)
def test_tiny_models_are_registered(name: str, tower: str):
    assert name in open_clip.list_models()
    model = open_clip.create_model(name)
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 1e7
    assert type(model.visual).__name__ == tower
    with torch.no_grad():
        features = model.encode_image(torch.randn(3, 3, 64, 64))
    assert features.shape == (3, 128) and torch.isfinite(features).all()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = open_clip.create_model("slipform-tiny", output_dict=True)
    model.eval()
    return model, open_clip.get_tokenizer("slipform-tiny")


def test_plain_caption_batches_are_untouched(tiny):
    model, tokenizer = tiny
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenizer(["a red cube", "two blue spheres"])
    out = model(images, tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    torch.testing.assert_close(out["text_features"], model.encode_text(tokens, normalize=True))


def test_packed_batches_yield_hard_negative_features(tiny):
    model, tokenizer = tiny
    captions = ["a red cube left of a blue sphere", "two green cones"]
    negatives = [
        [HardNegative("a blue cube left of a red sphere", "swap_attributes", 0.9)],
        [
            HardNegative("three green cones", "change_count", 0.4),
            HardNegative("two green cubes", "replace_object", 0.8),
        ],
    ]
    packed = torch.stack(
        [
            pack_caption_tokens(tokenizer([caption] + [n.text for n in negs]), negs, num_negatives=3)
            for caption, negs in zip(captions, negatives)
        ]
    )
    images = torch.randn(2, 3, 64, 64)
    out = model(images, packed)
    assert out["hn_text_features"].shape == (2, 3, 128)
    assert out["hn_mask"].tolist() == [[True, False, False], [True, True, False]]
    assert out["hn_scores"][1, :2].tolist() == pytest.approx([0.4, 0.8], abs=1e-6)
    torch.testing.assert_close(out["text_features"], model.encode_text(tokenizer(captions), normalize=True))
    expected = model.encode_text(
        tokenizer(["a blue cube left of a red sphere", "three green cones", "two green cubes"]), normalize=True
    )
    torch.testing.assert_close(out["hn_text_features"][0, 0], expected[0])
    torch.testing.assert_close(out["hn_text_features"][1, :2], expected[1:])
    assert torch.count_nonzero(out["hn_text_features"][~out["hn_mask"]]) == 0  # padding rows are never encoded
    # The loss accepts the model's output dict as is, and gradients reach the text tower through the negatives.
    loss = CementLoss(impl="reference")(**out, output_dict=True)["contrastive_loss"]
    loss.backward()
    assert model.token_embedding.weight.grad is not None
