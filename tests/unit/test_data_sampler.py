"""DistributedBucketSampler: determinism, resumable position, disjoint data-parallel shards, one shape per
micro-batch."""

import itertools

import pytest

from megatron_apt.data.sampler import DistributedBucketSampler


def _keys():
    # three shapes of different popularity (images, short and long clips)
    return [(1, 8, 8)] * 37 + [(5, 8, 8)] * 50 + [(9, 8, 12)] * 29


def test_deterministic_given_seed_and_epoch():
    a = DistributedBucketSampler(_keys(), 4, dp_rank=1, dp_size=2, seed=7)
    b = DistributedBucketSampler(_keys(), 4, dp_rank=1, dp_size=2, seed=7)
    assert list(a) == list(b)
    assert a.rank_batches(3) == b.rank_batches(3)
    assert a.rank_batches(0) != a.rank_batches(1)  # reshuffled per epoch
    assert (DistributedBucketSampler(_keys(), 4, seed=8).rank_batches(0)
            != DistributedBucketSampler(_keys(), 4, seed=7).rank_batches(0))


def test_dp_ranks_are_disjoint_and_cover_everything_when_divisible():
    keys = [(1, 8, 8)] * 24 + [(5, 8, 8)] * 48
    per_rank = [DistributedBucketSampler(keys, 3, dp_rank=r, dp_size=4, seed=1).rank_indices() for r in range(4)]
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == 72 and set(flat) == set(range(72))
    assert len({len(r) for r in per_rank}) == 1  # same number of steps on every rank


def test_dp_ranks_disjoint_with_remainders_dropped():
    keys = _keys()
    samplers = [DistributedBucketSampler(keys, 4, dp_rank=r, dp_size=3, seed=2) for r in range(3)]
    per_rank = [s.rank_indices() for s in samplers]
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat))
    assert len(flat) == sum(n // 12 * 12 for n in (37, 50, 29))
    assert len({len(s) for s in samplers}) == 1


def test_one_shape_per_micro_batch_and_same_shape_across_ranks_at_each_step():
    keys = _keys()
    samplers = [DistributedBucketSampler(keys, 4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    steps = list(zip(*[s.rank_batches(0) for s in samplers]))
    assert steps
    shapes_seen = set()
    for step in steps:
        shapes = {keys[i] for mb in step for i in mb}
        assert len(shapes) == 1
        shapes_seen |= shapes
        assert all(len(mb) == 4 for mb in step)
    assert shapes_seen == set(keys)  # every bucket contributes


def test_drop_last_false_sees_every_sample():
    keys = _keys()
    samplers = [DistributedBucketSampler(keys, 4, dp_rank=r, dp_size=2, seed=4, drop_last=False) for r in range(2)]
    flat = [i for s in samplers for i in s.rank_indices()]
    assert set(flat) == set(range(len(keys)))
    for s in samplers:
        assert all(len({keys[i] for i in mb}) == 1 for mb in s.rank_batches())


def test_resume_position_mid_epoch_and_across_epochs():
    s = DistributedBucketSampler(_keys(), 4, dp_rank=0, dp_size=2, seed=5)
    full = s.rank_batches(0)
    it = iter(s)
    first = list(itertools.islice(it, 3))
    state = s.state_dict()
    assert state["epoch"] == 0 and state["position"] == 3

    r = DistributedBucketSampler(_keys(), 4, dp_rank=0, dp_size=2, seed=5)
    r.load_state_dict(state)
    r.set_epoch(0)  # a training loop calling set_epoch with the same epoch must not rewind
    rest = list(r)
    assert first + rest == full
    assert r.epoch == 1 and r.position == 0  # exhausted: the next iteration is the next epoch
    assert list(r) == s.rank_batches(1)

    # an explicit consumed count (DataLoader prefetch runs ahead of training)
    st = s.state_dict(position=1)
    r2 = DistributedBucketSampler(_keys(), 4, dp_rank=0, dp_size=2, seed=5)
    r2.load_state_dict(st)
    assert next(iter(r2)) == full[1]


def test_state_from_another_schedule_is_refused():
    s = DistributedBucketSampler(_keys(), 4, dp_size=2, seed=5)
    for other in (DistributedBucketSampler(_keys(), 8, dp_size=2, seed=5),
                  DistributedBucketSampler(_keys(), 4, dp_size=1, seed=5),
                  DistributedBucketSampler(_keys()[:-1], 4, dp_size=2, seed=5)):
        with pytest.raises(ValueError, match="cannot be resumed"):
            other.load_state_dict(s.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="micro_batch_size"):
        DistributedBucketSampler(10, 0)
    with pytest.raises(ValueError, match="rank"):
        DistributedBucketSampler(10, 2, dp_rank=2, dp_size=2)
    assert len(DistributedBucketSampler(10, 3)) == 3  # an int means one bucket of that many samples
