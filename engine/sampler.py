"""The folder loader's order and augmentation randomness, both a function of (seed, epoch, position), so that a run
resumed in the middle of an epoch sees exactly the batches an unbroken run sees.

`EpochSampler` draws one permutation of the pairs per epoch from a generator seeded with (seed, epoch), the same on
every process, and gives process `rank` every `world_size`-th position of it (as DistributedSampler does, with
drop_last). Beside each index it yields a seed for that sample's augmentation; `SeededItems` decodes and crops the
sample with torch's generator set to that seed. So a sample's crop depends neither on the loader worker that
happens to load it nor on what that worker loaded before, and resuming is skipping positions: `resume_at(n)` makes
the next epoch's iteration start at its n-th sample, without reading the skipped ones.

Why not torchdata's StatefulDataLoader: for a sampler like this one it saves the same position (samples yielded),
but its loader workers restart their random streams from the saved base seed, so the crops after a resume would
differ from the unbroken run's; with a seed per sample the position is all there is to save.
"""
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler):
    """(index, augmentation seed) pairs of this process's share of a seeded per-epoch permutation."""

    def __init__(self, dataset_size, rank=0, world_size=1, seed=0):
        self.size, self.rank, self.world_size, self.seed = dataset_size, rank, world_size, seed
        self.epoch = 0
        self.start = 0  # samples of the next iteration to skip (a mid-epoch resume), then back to 0

    def __len__(self):
        return self.size // self.world_size  # as DistributedSampler with drop_last: every process the same count

    def set_epoch(self, epoch):
        self.epoch = epoch

    def resume_at(self, samples):
        """Start the next iteration after this process's first `samples` samples of the epoch."""
        self.start = samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[:len(self) * self.world_size]  # (N,)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)[:len(order)]  # (N,) one per position
        mine = slice(self.rank + self.start * self.world_size, None, self.world_size)
        self.start = 0
        return iter(zip(order[mine].tolist(), seeds[mine].tolist(), strict=True))


class SeededItems(Dataset):
    """`dataset[index]` with torch's generator seeded by the sampler's per-sample seed, and restored afterwards:
    in the main process (num-workers 0) the training's own random stream (dropout, colour jitter) is untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
