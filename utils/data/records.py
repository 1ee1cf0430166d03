"""Prepared data: the record format of `<split>.npy`, and reading it back in batches.

`prepare_data.py` (with utils/data/prepare.py) turns each split's text file
(`train.txt`, `dev.txt`, `test.txt`: one example per line, lines ending as
with `str.splitlines`) into `<split>.npy`. Each non-empty line becomes

    <|endoftext|> + BPE(line) + <|endoftext|>

as in the original Texar example: the BPE tokens are cut to
`max_seq_length - 2` first, so every example keeps both special tokens, then
padded with <|endoftext|> to `max_seq_length`.

The file is a plain NumPy `.npy` holding a 1-D structured array, one record per
example:

    length    int32                        tokens in the example, specials included
    text_ids  uint16[max_seq_length]       token ids, padded (int32 for vocabularies
                                           larger than 65,536)

Conditional data (`<split>.tsv`, `source<TAB>target` per line, see
utils/data/pairs.py) is framed as

    <|endoftext|> + BPE(source) + <|endoftext|> + BPE(target) + <|endoftext|>

and its records carry one more field:

    context_length  int32    tokens before the target: BPE(source) + 2

The loss counts only the tokens from `context_length` on (the target and its
closing <|endoftext|>). A file without the field (every file written before
conditional data existed, and every `.txt` split) is all target, as if
context_length were 1: only the opening <|endoftext|> is never predicted.

It loads with `allow_pickle=False` and memory-maps (`mmap_mode="r"`), so a
corpus larger than RAM trains without being read in whole. Files are written
to a temporary name in the output directory and renamed into place once
complete: an interrupted run never leaves a half-written split.

`PreparedSplit` reads such a file back and builds batches padded only to the
longest example in the batch.
"""
import math
import os
from typing import Iterator, List, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from utils.errors import UserError

SPLITS = ("train", "dev", "test")
LENGTH_FIELD = "length"
IDS_FIELD = "text_ids"
CONTEXT_FIELD = "context_length"   # conditional records only
# GPT-2's n_ctx is 1024; allow bigger-context configs, but not sizes whose
# records (2 bytes a token) could not be allocated.
MAX_SEQ_LENGTH = 65536


def split_text_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.txt")


def split_pairs_path(data_dir: str, split: str) -> str:
    """A conditional split's text: `source<TAB>target` per line."""
    return os.path.join(data_dir, f"{split}.tsv")


def split_data_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.npy")


def record_dtype(max_seq_length: int, vocab_size: int,
                 conditional: bool = False) -> np.dtype:
    """The record layout of a prepared file; ids as uint16 when they fit."""
    id_type = "<u2" if vocab_size <= 2 ** 16 else "<i4"
    fields = [(LENGTH_FIELD, "<i4"), (IDS_FIELD, id_type, (max_seq_length,))]
    if conditional:
        fields.append((CONTEXT_FIELD, "<i4"))
    return np.dtype(fields)


def check_max_seq_length(max_seq_length: int) -> None:
    if max_seq_length < 3:
        raise UserError(f"--max_seq_length must be at least 3 (got {max_seq_length}): "
                        f"it counts the two <|endoftext|> tokens around each line")
    if max_seq_length > MAX_SEQ_LENGTH:
        raise UserError(f"--max_seq_length {max_seq_length} is too large: use 3 to "
                        f"{MAX_SEQ_LENGTH} (GPT-2 models read at most 1024 tokens)")



# ---------------------------------------------------------------------------
# Reading prepared files back

class PreparedSplit:
    """A prepared `.npy` split, memory-mapped; builds padded batches.

    `lengths` (int64, one per example) is read into memory; the token ids stay
    on disk until a batch asks for them.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise UserError(f"prepared data not found: {path}; run "
                            f"'python prepare_data.py --data_dir <dir with "
                            f"{os.path.basename(path)[:-4]}.txt>' first (or fix data_dir "
                            f"in the training config)")
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{path} is not a prepared data file ({err}); run "
                            f"prepare_data.py again") from None
        names = data.dtype.names or ()
        if (data.ndim != 1 or names not in ((LENGTH_FIELD, IDS_FIELD),
                                            (LENGTH_FIELD, IDS_FIELD, CONTEXT_FIELD))
                or data.dtype[IDS_FIELD].ndim != 1 or len(data) == 0):
            raise UserError(f"{path} is not a prepared data file (expected records "
                            f"of '{LENGTH_FIELD}' and '{IDS_FIELD}'); run "
                            f"prepare_data.py again")
        self._data = data
        self.max_seq_length = int(data.dtype[IDS_FIELD].shape[0])
        self.lengths = np.asarray(data[LENGTH_FIELD], dtype=np.int64)
        if self.lengths.min() < 2 or self.lengths.max() > self.max_seq_length:
            raise UserError(f"{path} holds example lengths outside 2..{self.max_seq_length}: "
                            f"it is damaged; run prepare_data.py again")
        # Where each example's target starts: the context_length field of
        # conditional records; 1 for plain text (all but <|endoftext|> counts).
        self.conditional = CONTEXT_FIELD in names
        if self.conditional:
            self.target_starts = np.asarray(data[CONTEXT_FIELD], dtype=np.int64)
            if (self.target_starts.min() < 2
                    or (self.target_starts > self.lengths).any()):
                raise UserError(f"{path} holds context lengths outside 2..length: "
                                f"it is damaged; run prepare_data.py again")
        else:
            self.target_starts = np.ones_like(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_targets(self) -> int:
        """Tokens the loss counts: every token from each example's target start
        (for plain text every token but the first)."""
        return int((self.lengths - self.target_starts).sum())

    @property
    def context_lengths(self) -> np.ndarray:
        """Tokens --do_test continues from, per example: for plain text the
        whole line without its closing <|endoftext|>, for conditional data
        <|endoftext|> source <|endoftext|>."""
        return self.target_starts if self.conditional else self.lengths - 1

    def starts(self, indices: Sequence[int]):
        """int64 [B]: where each example's loss begins (see lm.target_mask)."""
        import torch
        return torch.from_numpy(self.target_starts[np.asarray(indices, dtype=np.int64)])

    def example(self, index: int) -> List[int]:
        """The token ids of one example, padding removed."""
        return self._data[IDS_FIELD][index, :self.lengths[index]].tolist()

    def batch(self, indices: Sequence[int], pad_id: int):
        """(ids int64 [B, T], lengths int64 [B]) with T the longest in the batch."""
        import torch
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        longest = int(lengths.max())
        ids = np.asarray(self._data[IDS_FIELD][indices, :longest], dtype=np.int64)
        # Records are padded with EOS already; pad_id only matters if it differs.
        ids[np.arange(longest)[None, :] >= lengths[:, None]] = pad_id
        return torch.from_numpy(ids), torch.from_numpy(lengths)

    def batches_by_length(self, batch_size: int) -> List[np.ndarray]:
        """Index batches covering every example once, similar lengths together.

        For evaluation and generation, where order does not matter: sorting
        keeps padding, and so wasted compute, to a minimum.
        """
        order = np.argsort(self.lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- sharding an epoch over ranks

PAD_INDEX = -1  # a sampler slot with no example (see ShardSampler)


class ShardSampler(Sampler):
    """This rank's share of one epoch's global example order.

    The global order is torch.randperm(dataset_len) seeded with seed + epoch
    (identity when shuffle=False) and does not depend on the world size; rank r
    of W yields order[start:][r::W]. When the remaining length is not a
    multiple of W, the order is padded with PAD_INDEX (-1), so every rank yields
    the same number of indices, ceil((dataset_len - start) / W), and takes the
    same number of steps. The trainer turns a PAD_INDEX into a row without
    targets: unlike wrapping around (torch's DistributedSampler), no example
    counts twice, so W ranks still train exactly as one process. W = 1 pads
    nothing.

    Mid-epoch resume: `set_start(n)` skips the first n examples of the epoch's
    GLOBAL order (n = optimizer steps done x global batch), so a job can resume
    with a different world size. `set_epoch` resets the start to 0; call
    `set_start` after it.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, start: int = 0):
        if dataset_len < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler layout: {dataset_len} examples, "
                             f"rank {rank} of {world_size}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.set_start(start)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch's order (seed + epoch) from its beginning."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, index: int) -> None:
        """Skip the first `index` examples of this epoch's global order."""
        if not 0 <= index <= self.dataset_len:
            raise ValueError(f"start {index} outside an epoch of {self.dataset_len}")
        self.start = int(index)

    def global_order(self) -> torch.Tensor:
        """The whole epoch's example order, identical on every rank."""
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=gen)

    def __len__(self) -> int:
        return math.ceil((self.dataset_len - self.start) / self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        rest = order[self.start:]
        short = len(self) * self.world_size - len(rest)
        if short:
            rest = torch.cat([rest, torch.full((short,), PAD_INDEX, dtype=rest.dtype)])
        return iter(rest[self.rank::self.world_size].tolist())
