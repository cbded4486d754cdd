"""The --hn data path: packing, the WebDataset stage (bad samples, faulty generators, precomputed negatives,
pickling), and its place inside OpenCLIP's real training pipeline (and absence from validation)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import open_clip_train.data as data
import open_clip_train.params as params
import pytest
import torch

from slipform_plugin import integration
from slipform_plugin.data_stage import CaptionWithNegatives, HardNegativeStage, TokenizerWithNegatives
from slipform_plugin.hard_negatives import KIND_TO_ID, HardNegative
from slipform_plugin.packing import META_COLUMNS, pack_caption_tokens, unpack_batch


class Swapper:
    """Deterministic generator: swaps the first two words, and the last two."""

    def plant(self, captions, keys):
        out = []
        for caption in captions:
            words = caption.split()
            negatives = []
            if len(words) >= 2:
                negatives.append(HardNegative(" ".join([words[1], words[0], *words[2:]]), "swap_objects", 0.75))
                negatives.append(HardNegative(" ".join([*words[:-2], words[-1], words[-2]]), "swap_attributes", 0.25))
            out.append(negatives)
        return out


class Faulty:
    """Returns copies of the caption, duplicates, junk, and raises on captions containing 'boom'."""

    def plant(self, captions, keys):
        if any("boom" in c for c in captions):
            raise RuntimeError("generator crashed")
        return [
            [
                HardNegative(c, "other", 0.5),  # the positive itself: must never become a negative
                HardNegative(c + " again", "other", 0.5),
                HardNegative(c + " again", "other", 0.5),  # duplicate
                {"text": "  ", "kind": "other", "score": 0.1},  # empty
                "not a negative",
            ]
            for c in captions
        ]


def samples(captions):
    return [{"__key__": f"k{i}", "text": caption} for i, caption in enumerate(captions)]


def test_pack_and_unpack_round_trip():
    tokens = torch.arange(3 * 5).reshape(3, 5)
    negatives = [HardNegative("a", "change_count", 0.3), HardNegative("b", "swap_objects", 1.0)]
    packed = pack_caption_tokens(tokens, negatives, num_negatives=4)
    assert packed.shape == (5, 5 + META_COLUMNS)
    batch_tokens, mask, kinds, scores = unpack_batch(packed[None])
    assert torch.equal(batch_tokens[0, :3], tokens) and torch.count_nonzero(batch_tokens[0, 3:]) == 0
    assert mask.tolist() == [[True, True, False, False]]
    assert kinds[0, :2].tolist() == [KIND_TO_ID["change_count"], KIND_TO_ID["swap_objects"]]
    assert scores[0].tolist() == pytest.approx([0.3, 1.0, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="expected at most 1 negatives, got 2"):
        pack_caption_tokens(tokens, negatives, num_negatives=1)


def test_stage_adds_negatives_and_counts():
    stage = HardNegativeStage(Swapper(), num_negatives=3, batch_size=2)
    out = list(stage(samples(["red cube left of sphere", "cone", "blue ball"])))
    assert [type(s["text"]) for s in out] == [CaptionWithNegatives] * 3
    assert [n.text for n in out[0]["text"].negatives] == ["cube red left of sphere", "red cube left sphere of"]
    assert out[1]["text"].negatives == []  # one word: nothing to swap, the row will be masked
    assert [n.text for n in out[2]["text"].negatives] == ["ball blue"]  # both swaps give the same text: kept once


def test_stage_survives_bad_samples_and_a_faulty_generator():
    stage = HardNegativeStage(Faulty(), num_negatives=3, batch_size=4)
    bad = [None, b"bytes caption", "", "boom", "\x00\x07 control", "🙂" * 5, "x" * 10_000, "<b>html</b>"]
    batch = [{"__key__": f"k{i}", "text": caption} for i, caption in enumerate(bad)]
    out = list(stage(batch))
    assert len(out) == len(bad)
    for sample in out:
        caption = sample["text"].caption
        assert isinstance(caption, str)
        for negative in sample["text"].negatives:
            assert negative.text.strip() and negative.text != caption
        assert len({n.text for n in sample["text"].negatives}) == len(sample["text"].negatives)
    assert out[1]["text"].caption == "bytes caption"
    by_caption = {s["text"].caption: s["text"].negatives for s in out}
    assert by_caption["boom"] == []  # its whole batch failed, then it failed alone: masked, counted
    assert [n.text for n in by_caption["<b>html</b>"]] == ["<b>html</b> again"]
    assert stage.stats["generator_errors"] == 1 and stage.stats["caption_errors"] == 1


def test_precomputed_negatives_are_used():
    stored = [HardNegative("a blue cube", "replace_attribute", 0.6).to_json()]
    batch = [{"__key__": "k0", "text": "a red cube", "hn.json": json.dumps(stored).encode()}]
    stage = HardNegativeStage(Faulty(), num_negatives=2)
    (sample,) = list(stage(batch))
    assert sample["text"].negatives == [HardNegative("a blue cube", "replace_attribute", 0.6)]
    assert stage.stats["precomputed"] == 1


def test_stage_and_tokenizer_pickle():
    stage = pickle.loads(pickle.dumps(HardNegativeStage(Swapper(), 2)))
    tokenizer = pickle.loads(pickle.dumps(TokenizerWithNegatives(open_clip.get_tokenizer("slipform-tiny"), 2)))
    (sample,) = list(stage(samples(["red cube left of sphere"])))
    packed = tokenizer(sample["text"])[0]
    assert packed.shape == (3, 64 + META_COLUMNS)
    assert tokenizer.context_length == 64  # attributes of the wrapped tokenizer stay reachable


def _args(shards: str, *extra: str):
    args = params.parse_args(
        ["--train-data", shards, "--train-num-samples", "64", "--val-data", shards, "--val-num-samples", "16",
         "--dataset-type", "webdataset", "--batch-size", "8", "--workers", "0", *extra]
    )  # fmt: skip
    args.world_size, args.rank, args.distributed = 1, 0, False
    return args


def test_stage_sits_before_tokenisation_in_training_only(synthetic_shards, monkeypatch):
    """Guards the OpenCLIP pipeline shape this hook relies on: fails if upstream moves the tokenising map_dict."""
    monkeypatch.setattr("slipform_plugin.registry.get_hard_negative_factory", lambda name: lambda args: Swapper())
    shards, _ = synthetic_shards
    args = _args(shards, "--loss", "cement", "--hn", "concreteplant", "--hn-num", "2")
    _, _, preprocess = open_clip.create_model_and_transforms("slipform-tiny")
    tokenizer = open_clip.get_tokenizer("slipform-tiny")
    train = data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    stages = integration._sample_pipeline(train.dataloader)
    names = [getattr(getattr(s, "f", s), "__name__", type(s).__name__) for s in stages]
    position = names.index("HardNegativeStage")
    assert names[position + 1] == "_map_dict" and names[position - 1] == "_rename"
    images, texts = next(iter(train.dataloader))
    assert images.shape == (8, 3, 64, 64) and texts.shape == (8, 3, 64 + META_COLUMNS)
    _, mask, kinds, _ = unpack_batch(texts)
    assert mask.any() and set(kinds[mask].tolist()) <= {KIND_TO_ID["swap_objects"], KIND_TO_ID["swap_attributes"]}
    # Validation pipelines stay OpenCLIP's: plain [B, L] tokens, no stage.
    val = data.get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer)
    assert "HardNegativeStage" not in [type(s).__name__ for s in integration._sample_pipeline(val.dataloader)]
    _, val_texts = next(iter(val.dataloader))
    assert val_texts.shape == (8, 64)


def test_no_stage_without_hn(synthetic_shards):
    shards, _ = synthetic_shards
    args = _args(shards, "--loss", "cement")
    _, _, preprocess = open_clip.create_model_and_transforms("slipform-tiny")
    train = data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("slipform-tiny"))
    assert "HardNegativeStage" not in [type(s).__name__ for s in integration._sample_pipeline(train.dataloader)]
    _, texts = next(iter(train.dataloader))
    assert texts.shape == (8, 64)


def test_corrupt_shards_and_captionless_samples_are_skipped(synthetic_shards, tmp_path, monkeypatch):
    """A truncated shard and samples without captions do not stop the --hn training pipeline."""
    import io
    import shutil
    import tarfile

    from braceexpand import braceexpand

    monkeypatch.setattr("slipform_plugin.registry.get_hard_negative_factory", lambda name: lambda args: Swapper())
    good = list(braceexpand(synthetic_shards[0]))
    shutil.copy(good[0], tmp_path / "shard-00000.tar")
    truncated = Path(good[1]).read_bytes()
    (tmp_path / "shard-00001.tar").write_bytes(truncated[: len(truncated) // 3])  # cut mid-member
    with tarfile.open(good[2]) as source, tarfile.open(tmp_path / "shard-00002.tar", "w") as target:
        for member in source.getmembers():
            if member.name.endswith(".txt") and int(member.name.split(".")[0][-1]) % 2 == 0:
                continue  # every other sample loses its caption
            target.addfile(member, io.BytesIO(source.extractfile(member).read()))
    args = _args(str(tmp_path / "shard-{00000..00002}.tar"), "--loss", "cement", "--hn", "concreteplant")
    args.train_num_samples = 200
    _, _, preprocess = open_clip.create_model_and_transforms("slipform-tiny")
    train = data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("slipform-tiny"))
    batches = 0
    for images, texts in train.dataloader:
        assert texts.ndim == 3 and images.shape[0] == texts.shape[0]
        batches += 1
    assert batches == train.dataloader.num_batches


def _caption_order(args, preprocess, tokenizer):
    train = data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    return torch.cat([texts for _, texts in train.dataloader]), integration._sample_pipeline(train.dataloader)


@pytest.mark.parametrize("hn", [(), ("--hn", "concreteplant", "--hn-num", "2")], ids=["no-hn", "hn"])
def test_seed_sample_shuffle_repeats_the_sample_order(synthetic_shards, monkeypatch, hn):
    """OpenCLIP seeds its sample shuffle from the clock; --seed-sample-shuffle makes the order a function of --seed."""
    from slipform_plugin.data_stage import SeededSampleShuffle

    monkeypatch.setattr("slipform_plugin.registry.get_hard_negative_factory", lambda name: lambda args: Swapper())
    shards, _ = synthetic_shards
    _, _, preprocess = open_clip.create_model_and_transforms("slipform-tiny")
    tokenizer = open_clip.get_tokenizer("slipform-tiny")
    args = _args(shards, "--loss", "cement", "--seed-sample-shuffle", "--seed", "3", *hn)
    first, stages = _caption_order(args, preprocess, tokenizer)
    assert sum(isinstance(stage, SeededSampleShuffle) for stage in stages) == 1
    assert not [s for s in stages if getattr(getattr(s, "f", None), "__name__", "") == "_shuffle"]
    again, _ = _caption_order(args, preprocess, tokenizer)
    assert torch.equal(first, again)
    other, _ = _caption_order(
        _args(shards, "--loss", "cement", "--seed-sample-shuffle", "--seed", "4", *hn), preprocess, tokenizer
    )
    assert first.shape == other.shape and not torch.equal(first, other)  # another seed, another order
