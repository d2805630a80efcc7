"""The training images of an epoch: shards, repeat factors, aspect-ratio batches, resume.

What a run trains must be a function of the seed and the epoch alone (so that a resumed
run trains what the uninterrupted one would), the same number of batches on every
process, each image of the epoch's list exactly once over all processes.
"""

import collections
import math

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runs import lightning_trainer
from torch.utils.data import DataLoader

from alrp_d2.data.sampling import (
    DataError,
    EpochBatchSampler,
    EpochShardSampler,
    aspect_ratio_groups,
)


def test_plain_epochs_are_the_seeded_permutation_dealt_round_robin():
    """The list of epoch e is randperm(n) under seed + e, as before repeat factors existed
    (resumed runs of older checkpoints see the same images)."""
    sampler = EpochShardSampler(10, num_replicas=3, rank=1, seed=5)
    generator = torch.Generator().manual_seed(5 + 2)
    order = torch.randperm(10, generator=generator).tolist()
    padded = order + order[:2]  # 12 = 4 per rank
    assert sampler.shard(2) == padded[1::3]
    assert len(sampler) == 4


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 40),
    world=st.integers(1, 4),
    batch=st.integers(1, 6),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 1000),
    grouped=st.booleans(),
    data=st.data(),
)
def test_batches_cover_the_epoch_once_the_same_count_on_every_rank(
    size, world, batch, epoch, seed, grouped, data
):
    kinds = data.draw(st.integers(1, 4))
    groups = data.draw(st.lists(st.integers(0, kinds - 1), min_size=size, max_size=size))
    everything = collections.Counter()
    counts = set()
    for rank in range(world):
        sampler = EpochShardSampler(size, num_replicas=world, rank=rank, seed=seed)
        batches = EpochBatchSampler(sampler, batch, groups if grouped else None).batches(epoch)
        counts.add(len(batches))
        assert len(batches) == math.ceil(len(sampler) / batch)
        assert all(1 <= len(b) <= batch for b in batches)
        assert collections.Counter(i for b in batches for i in b) == collections.Counter(
            sampler.shard(epoch)
        )
        everything.update(i for b in batches for i in b)
        if grouped:  # mixed batches only from the buckets' remainders, at the end
            mixed = [k for k, b in enumerate(batches) if len({groups[i] for i in b}) > 1]
            assert all(k >= len(batches) - kinds for k in mixed)
    assert len(counts) == 1
    # Every image once; the padding (to equal shards) repeats at most world - 1 of them.
    assert set(everything) == set(range(size))
    assert sum(everything.values()) - size < world


def test_grouped_batches_are_landscape_or_portrait_only():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0] * 4
    batches = EpochBatchSampler(EpochShardSampler(len(groups), seed=3), 4, groups).batches(0)
    assert all(len({groups[i] for i in b}) == 1 for b in batches)  # 24 and 24: no remainder


@pytest.mark.parametrize("grouped", [False, True])
def test_batches_are_a_function_of_seed_and_epoch(grouped):
    groups = [i % 3 == 0 for i in range(23)] if grouped else None

    def batches(seed, epoch):
        return EpochBatchSampler(EpochShardSampler(23, seed=seed), 4, groups).batches(epoch)

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2)
    assert batches(0, 1) != batches(1, 1)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("done", [0, 1, 3, 5])
def test_resume_at_continues_with_the_next_batch_of_the_same_epoch(grouped, done):
    groups = [int(i % 4 == 0) for i in range(21)] if grouped else None
    sampler = EpochBatchSampler(EpochShardSampler(21, num_replicas=2, rank=1, seed=7), 2, groups)
    expected = [[(4, i) for i in b] for b in sampler.batches(4)[done:]]
    sampler.resume_at(4, done)
    assert list(sampler) == expected
    assert len(sampler) == 6  # the whole epoch, as Lightning expects
    # Only the resumed epoch is cut: the next one is whole.
    sampler.set_epoch(5)
    assert len(list(sampler)) == 6


def test_aspect_ratio_groups_and_a_record_without_size():
    sizes = [(640, 480), (480, 640), (5, 5), (640, 427), (640, 360), (427, 640), (600, 450)]
    dicts = [dict(width=w, height=h) for w, h in sizes]
    # Detectron2's two buckets: width > height, and the rest.
    assert aspect_ratio_groups(dicts, (1.0,)) == [1, 0, 0, 1, 1, 0, 1]
    # The default: 4:3, 3:4, square, 3:2, 16:9 and 2:3 apart; 4:3 with 4:3.
    assert aspect_ratio_groups(dicts) == [5, 2, 3, 6, 7, 1, 5]
    with pytest.raises(DataError, match="'b.jpg' has no 'width' and 'height'.*GROUPING False"):
        aspect_ratio_groups([{"file_name": "b.jpg", "height": 3}])


FACTORS = torch.tensor([1.0, 1.0, 2.5, 1.2, 3.0, 1.0, 1.7])


def counts_of(sampler, epoch):
    return collections.Counter(sampler.epoch_indices(epoch))


def test_ceil_rounding_repeats_every_image_ceil_r_times_every_epoch():
    sampler = EpochShardSampler(7, seed=1, repeat_factors=FACTORS, rounding="ceil")
    assert sampler.epoch_size == 1 + 1 + 3 + 2 + 3 + 1 + 2
    for epoch in range(3):
        counts = counts_of(sampler, epoch)
        assert [counts[i] for i in range(7)] == [1, 1, 3, 2, 3, 1, 2]


def test_stochastic_rounding_is_detectron2s_in_expectation():
    """floor(r) copies plus one with probability frac(r), drawn anew each epoch; the epoch
    has ceil(sum r) images."""
    sampler = EpochShardSampler(7, seed=2, repeat_factors=FACTORS)
    assert sampler.epoch_size == math.ceil(float(FACTORS.sum()))
    epochs = 3000
    total = collections.Counter()
    for epoch in range(epochs):
        counts = counts_of(sampler, epoch)
        assert sum(counts.values()) == sampler.epoch_size
        total.update(counts)
    mean = torch.tensor([total[i] / epochs for i in range(7)], dtype=torch.float64)
    # The draws are cut or extended to ceil(sum r): each image's mean is r scaled by about
    # ceil(sum r) / sum r (here 12 / 11.4); the binomial noise of 3000 epochs is < 0.02.
    expected = FACTORS.double() * sampler.epoch_size / float(FACTORS.sum())
    assert torch.allclose(mean, expected, atol=0.05), (mean, expected)
    assert counts_of(sampler, 0) != counts_of(sampler, 1)


def test_bad_repeat_settings_are_named():
    with pytest.raises(ValueError, match="at least 1"):
        EpochShardSampler(2, repeat_factors=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="rounding must be one of stochastic, ceil"):
        EpochShardSampler(2, repeat_factors=torch.ones(2), rounding="floor")
    with pytest.raises(ValueError, match="empty"):
        EpochShardSampler(0)


class _Recorder(pl.LightningModule):
    """Records the dataset indices of every training batch, by epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = collections.defaultdict(list)

    def training_step(self, batch, batch_idx):
        self.seen[self.current_epoch].append(sorted(int(i) for i in batch))
        return (self.weight * 0).sum() + self.weight.sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_sets_the_epoch_of_the_batch_sampler(tmp_path):
    """The installed Lightning calls ``set_epoch`` on a loader's batch sampler: each epoch
    trains its own batches (else every epoch would repeat epoch 0's)."""
    groups = [i % 2 for i in range(10)]
    batches = EpochBatchSampler(EpochShardSampler(10, seed=4), 3, groups)
    indices = {(epoch, i): i for epoch in range(3) for i in range(10)}  # (epoch, index) keys
    loader = DataLoader(indices, batch_sampler=batches, collate_fn=torch.tensor)
    module = _Recorder()
    trainer = lightning_trainer(tmp_path, max_epochs=3, use_distributed_sampler=False)
    trainer.fit(module, loader)
    for epoch in range(3):
        assert module.seen[epoch] == [sorted(b) for b in batches.batches(epoch)]
    assert module.seen[0] != module.seen[1]


def test_resume_position_survives_a_loader_with_workers():
    """A loader with workers calls iter() on its batch sampler twice before the first
    batch: the resume position must reach the iterator that is used."""
    batches = EpochBatchSampler(EpochShardSampler(20, seed=1), 4)
    expected = batches.batches(3)[2:]
    batches.resume_at(3, 2)
    keys = {(3, i): i for i in range(20)}
    loader = DataLoader(keys, batch_sampler=batches, num_workers=1, collate_fn=list)
    assert list(loader) == expected


@pytest.mark.detectron2
@pytest.mark.parametrize("sqrt", [True, False])
def test_repeat_factors_are_detectron2s_on_the_training_set(tmp_path, monkeypatch, sqrt):
    """The data module's factors for DATALOADER.SAMPLER_TRAIN RepeatFactorTrainingSampler
    equal Detectron2's, and LVIS's rule written out: an image's factor is the largest over
    its classes c of max(1, (t / f_c) ** (1/2 if REPEAT_SQRT else 1)), f_c the fraction of
    the training images holding c."""
    from detectron2.data.samplers import RepeatFactorTrainingSampler
    from runs import TINY

    from alrp_d2.cli import load_config
    from alrp_d2.data.synthetic import register_synthetic
    from alrp_d2.engine.data import DetectionDataModule

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_synthetic(str(tmp_path / "alrp_synthetic"))
    cfg = load_config(TINY, [])
    cfg.merge_from_list(["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"])
    cfg.merge_from_list(["DATALOADER.REPEAT_THRESHOLD", "0.9", "DATALOADER.REPEAT_SQRT", sqrt])
    data = DetectionDataModule(cfg)
    dicts = data.train_dicts()
    ours = data.epoch_sampler().repeat_factors
    theirs = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.9, sqrt)
    assert torch.equal(ours, theirs.double())
    classes = [{a["category_id"] for a in d["annotations"]} for d in dicts]
    frequency = collections.Counter(c for image in classes for c in image)
    power = 0.5 if sqrt else 1.0
    by_hand = [
        max((max(1.0, (0.9 * len(dicts) / frequency[c]) ** power) for c in image), default=1.0)
        for image in classes
    ]
    assert torch.allclose(ours, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-6)
    assert len(set(by_hand)) > 2  # the case distinguishes images
    assert data.epoch_size() == math.ceil(sum(by_hand) - 1e-6)
    # Computed (and logged, a line per category) once per run.
    calls = []
    monkeypatch.setattr(
        RepeatFactorTrainingSampler,
        "repeat_factors_from_category_frequency",
        lambda *args, **kwargs: calls.append(args),
    )
    assert torch.equal(data.epoch_sampler(2, 1).repeat_factors, ours) and calls == []


@pytest.mark.detectron2
def test_a_run_checkpointed_before_grouping_is_not_resumed_with_other_batches():
    """A checkpoint of a version that batched in shard order and ignored SAMPLER_TRAIN (its
    config has no DATALOADER.REPEAT_ROUNDING): resuming it mid-epoch with grouping or
    repeats would train some of the epoch's images twice and others never, so --resume
    names the keys; with both at what that version did, it resumes."""
    from runs import TINY

    from alrp_d2.cli import load_config
    from alrp_d2.engine.resume import config_differences

    now = load_config(TINY, [])
    old = now.clone()
    del old.DATALOADER["REPEAT_ROUNDING"], old.DATALOADER["ASPECT_RATIO_BINS"]
    assert config_differences(now.dump(), now) == []
    assert config_differences(old.dump(), now) == [
        "DATALOADER.ASPECT_RATIO_GROUPING: no grouping (checkpointed by a version that ignored"
        " it) -> True"
    ]
    repeat = load_config(TINY, ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"])
    changes = config_differences(old.dump(), repeat)
    assert any("SAMPLER_TRAIN: every image once" in change for change in changes)
    plain = load_config(TINY, ["DATALOADER.ASPECT_RATIO_GROUPING", "False"])
    assert config_differences(old.dump(), plain) == []
