"""A deterministic, data-parallel, shape-bucketed batch sampler with resumable state.

Per epoch, samples are grouped into buckets by a key (for videos the ``(T, H, W)`` shape), each
bucket is shuffled with a generator seeded by ``(seed, epoch)`` and cut into *global* batches of
``micro_batch_size * dp_size`` indices; the global batches of all buckets are then shuffled
together. Data-parallel rank ``r`` takes slice ``[r * mbs, (r + 1) * mbs)`` of each global batch,
so at every step all ranks hold micro-batches of the same shape (same compute, no stragglers) and
no index is seen by two ranks.

A bucket's last incomplete global batch is dropped (``drop_last=True``, the default; then the
ranks' indices are disjoint) or filled up by repeating indices of the same bucket
(``drop_last=False``; every sample is seen, a few twice).

``state_dict()`` holds the epoch and the position (micro-batches this rank has consumed in the
epoch); ``load_state_dict`` resumes at the same micro-batch. Used with a ``DataLoader`` that
prefetches, the sampler's own count runs ahead of training, so pass the number of consumed
micro-batches explicitly: ``sampler.state_dict(position=steps_done_this_epoch)``.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator, Sequence

import numpy as np


class DistributedBucketSampler:
    def __init__(
        self,
        keys: Sequence[Hashable] | int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        """``keys``: the bucket key of every sample (e.g. ``dataset.bucket_keys()``), or a sample count
        for one bucket."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel rank {dp_rank} of {dp_size}")
        if isinstance(keys, (int, np.integer)):
            keys = [0] * int(keys)
        self.num_samples = len(keys)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        # Buckets in a deterministic order (by key), each holding its indices in increasing order.
        groups: dict[Hashable, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        self.bucket_keys = sorted(groups, key=repr)
        self._buckets = [np.asarray(groups[k], dtype=np.int64) for k in self.bucket_keys]
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    # -- the schedule ------------------------------------------------------------------------
    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All global batches of an epoch, in order; each holds indices of one bucket."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        gb = self.global_batch_size
        batches: list[np.ndarray] = []
        for idx in self._buckets:
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            full = len(idx) // gb
            batches.extend(idx[b * gb : (b + 1) * gb] for b in range(full))
            rest = len(idx) - full * gb
            if rest and not self.drop_last:
                fill = np.resize(idx, gb - rest)  # repeats the bucket cyclically when it is small
                batches.append(np.concatenate([idx[full * gb :], fill]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's micro-batches of an epoch (lists of sample indices, one shape each)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        lo, hi = self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size
        out = [b[lo:hi].tolist() for b in self.global_batches(epoch)]
        self._cache = (epoch, out)
        return out

    def rank_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's sample indices of an epoch, flattened in order."""
        return [i for b in self.rank_batches(epoch) for i in b]

    # -- iteration -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the position resets only when the epoch changes (so resuming works)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def __len__(self) -> int:
        return len(self.rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        while self.position < len(batches):
            b = batches[self.position]
            self.position += 1
            yield b
        # Epoch finished: the next iteration starts the next epoch.
        self.epoch += 1
        self.position = 0

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position if position is None else int(position),
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, have in (("micro_batch_size", self.micro_batch_size), ("dp_size", self.dp_size),
                          ("num_samples", self.num_samples), ("seed", self.seed)):
            if key in state and int(state[key]) != have:
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this sampler has {have}: the batch "
                    "schedule differs, so the position cannot be resumed"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
