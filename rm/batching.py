"""The fast path: the pairs of one optimizer step, packed pad-free into few large micro-batches.

Optimizer-step semantics stay those of the plain path (`per_device_train_batch_size` pairs per micro-batch,
`gradient_accumulation_steps` micro-batches per step, loss = mean over each micro-batch's pairs, summed over the
step's micro-batches and divided by GA by accelerate / DeepSpeed):

- The plain micro-batches ("units") each process would get are rebuilt exactly: the same shuffled order (the same
  seeded RandomSampler, whose generator accelerate synchronises across processes) cut and sharded as accelerate's
  own BatchSamplerShard would (even_batches included).
- The GA units of one optimizer step on one process are packed into K micro-batches (first-fit decreasing under
  `max_tokens_per_micro_batch` real tokens; K is the same on every process, as ZeRO-2/3 need matching collectives).
  Each pair carries the weight 1/len(its unit), so a micro-batch's loss is the sum of its units' mean losses and
  the step's gradient equals the plain path's.
- The loader still yields one item per unit: the first GA-K items of a step are placeholders (no forward) that only
  advance `accelerator.accumulate`'s counter, so accelerate's GA bookkeeping, DeepSpeed's accumulation boundary,
  `len(train_loader)` and resume arithmetic (micro-batches = steps x GA) are unchanged.
- A packed micro-batch is one row of concatenated sequences with position ids restarting per sequence. On CUDA in
  bf16 its attention runs through torch's flash varlen kernel (rm/attention.py); elsewhere transformers' SDPA
  builds a block-diagonal causal mask from the restarting position ids.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens", "max_length")

Unit = list[int]  # dataset indices of one plain micro-batch


def plain_units_per_process(order: Sequence[int], batch_size: int, num_processes: int) -> list[list[Unit]]:
    """The plain micro-batches each process gets from accelerate for this sample order (even_batches=True)."""
    from accelerate.data_loader import BatchSamplerShard

    units = BatchSampler(list(order), batch_size, drop_last=False)
    if num_processes == 1:
        return [list(units)]
    return [list(BatchSamplerShard(units, num_processes, rank, split_batches=False, even_batches=True))
            for rank in range(num_processes)]


def micro_batches_per_process(pairs: int, batch_size: int, num_processes: int) -> int:
    """Plain micro-batches each process gets in an epoch (accelerate shards them evenly; the packed loader keeps
    the count): len(train_loader) after prepare, known before the loader exists."""
    return math.ceil(math.ceil(pairs / batch_size) / num_processes)


def pack_units(units: list[Unit], unit_tokens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: unit positions grouped into bins of at most max_tokens (a unit alone may exceed it)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for position in sorted(range(len(units)), key=lambda p: -unit_tokens[p]):
        tokens = unit_tokens[position]
        target = next((b for b, load in enumerate(loads) if load + tokens <= max_tokens), None)
        if target is None:
            bins.append([position])
            loads.append(tokens)
        else:
            bins[target].append(position)
            loads[target] += tokens
    return bins


def split_to_count(bins: list[list[int]], count: int) -> list[list[int]]:
    """Split bins until there are `count` of them: the last-packed (smallest) unit of the fullest bin moves out."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        fullest = max((b for b in bins if len(b) > 1), key=len)
        bins.append([fullest.pop()])
    return bins


class PackedStepSampler(Sampler[list]):
    """Yields, for every process in turn (accelerate's BatchSamplerShard deals them out round-robin), one item per
    plain micro-batch: `[]` (a placeholder) or a packed micro-batch as a list of (dataset index, unit size)."""

    def __init__(self, pair_tokens: Sequence[int], batch_size: int, gradient_accumulation_steps: int,
                 max_tokens: int, num_processes: int, generator: torch.Generator) -> None:
        self.pair_tokens = list(pair_tokens)
        self.unit_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_tokens = max_tokens
        self.num_processes = num_processes
        self.sampler = RandomSampler(range(len(self.pair_tokens)), generator=generator)  # found and synced by accelerate
        self.batch_size = None  # items have varying sizes: tells BatchSamplerShard not to compare lengths
        self.drop_last = True  # every epoch is whole rounds of num_processes items: nothing to pad

    def units_per_process(self) -> int:
        return micro_batches_per_process(len(self.pair_tokens), self.unit_size, self.num_processes)

    def __len__(self) -> int:
        return self.units_per_process() * self.num_processes

    def __iter__(self) -> Iterator[list]:
        per_process = plain_units_per_process(list(self.sampler), self.unit_size, self.num_processes)
        ga = self.gradient_accumulation_steps
        for start in range(0, len(per_process[0]), ga):
            steps = [units[start:start + ga] for units in per_process]
            tokens = [[sum(self.pair_tokens[i] for i in unit) for unit in units] for units in steps]
            bins = [pack_units(units, t, self.max_tokens) for units, t in zip(steps, tokens)]
            count = max(len(b) for b in bins)  # the same number of forwards on every process
            items = []
            for units, process_bins in zip(steps, bins):
                packed = [[(i, len(units[p])) for p in b for i in units[p]] for b in split_to_count(process_bins, count)]
                items.append([[]] * (len(units) - count) + packed)
            for position in range(len(steps[0])):
                for process_items in items:
                    yield process_items[position]


class KeyedPairs(Dataset):
    """Looks up (index, unit size) keys: the pair's token ids plus its loss weight 1 / unit size."""

    def __init__(self, pairs: Any) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, unit_size = key
        return {**self.pairs[index], "weight": 1.0 / unit_size}


TOKEN_BUCKETS = [512]
while TOKEN_BUCKETS[-1] < 2**20:  # 512, 640, 832, ...: x1.25, multiples of 64
    TOKEN_BUCKETS.append(-(-TOKEN_BUCKETS[-1] * 5 // 4 // 64) * 64)


def token_bucket(tokens: int) -> int:
    """The smallest TOKEN_BUCKETS size that holds `tokens`: the few fixed row lengths a CUDA graph is captured for
    (rm/graphs.py), padding at most 25%."""
    return TOKEN_BUCKETS[bisect.bisect_left(TOKEN_BUCKETS, tokens)]


def filler_slots(bucket: int, max_sequence_tokens: int) -> int:
    """Filler sequences a row of this bucket gets: it holds more tokens than the bucket below, so its filler is
    shorter than the step between the two, cut into pieces of at most max_sequence_tokens."""
    position = TOKEN_BUCKETS.index(bucket)
    below = TOKEN_BUCKETS[position - 1] if position else 0
    return -(-(bucket - below) // max_sequence_tokens)


class PackedPairCollator:
    """One row: every chosen sequence, then every rejected one, concatenated without padding; position ids
    restart at each sequence; cu_seq_lens holds the sequence boundaries (int32, as varlen kernels want).

    With `pair_slots` (CUDA graphs, rm/graphs.py) the shapes are static per token bucket: the chosen and the
    rejected sequences each get `pair_slots` boundaries (empty sequences after the real ones: chosen rewards are
    `[:pair_slots]`, rejected ones `[pair_slots:2 * pair_slots]`), and the row is filled up to its token_bucket by
    filler_slots sequences of `pad_id` of at most `max_sequence_tokens` each (so attention never sees a sequence
    longer than real ones can be). Margin and weight are padded with zeros: the empty slots add nothing to the
    loss. `pairs` holds the real count."""

    def __init__(self, pair_slots: int | None = None, max_sequence_tokens: int = 0, pad_id: int = 0) -> None:
        self.pair_slots, self.max_sequence_tokens, self.pad_id = pair_slots, max_sequence_tokens, pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            return {}  # placeholder: counts toward gradient accumulation, runs nothing
        chosen = [f["chosen_input_ids"] for f in features]
        rejected = [f["rejected_input_ids"] for f in features]
        weights = [float(f["weight"]) for f in features]
        margins = [float(f.get("margin", 0.0)) for f in features]
        rows = chosen + rejected
        lengths = [len(r) for r in rows]
        real_tokens, max_length = sum(lengths), max(lengths)
        if self.pair_slots is not None:
            empty = [[]] * (self.pair_slots - len(features))
            bucket, piece = token_bucket(real_tokens), self.max_sequence_tokens
            filler = bucket - real_tokens
            pieces = [[self.pad_id] * max(0, min(piece, filler - start))
                      for start in range(0, filler_slots(bucket, piece) * piece, piece)]
            rows = chosen + empty + rejected + empty + pieces
            lengths = [len(r) for r in rows]
            weights += [0.0] * len(empty)
            margins += [0.0] * len(empty)
        cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), torch.tensor(lengths), output_size=sum(lengths))
        return {
            "input_ids": torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)[None],
            "position_ids": (torch.arange(sum(lengths)) - starts)[None],
            "cu_seq_lens": cu_seq_lens,
            "max_length": max_length,
            "margin": torch.tensor(margins, dtype=torch.float32),
            "pair_weight": torch.tensor(weights, dtype=torch.float32),
            "num_tokens": torch.tensor(real_tokens),
            "micro_batches": round(sum(weights)),  # plain micro-batches this one stands for (logged loss average)
            "pairs": len(features),
        }


def is_placeholder(batch: dict[str, Any]) -> bool:
    return "input_ids" not in batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a (padded or packed) batch that RewardModel.forward takes."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def pair_token_counts(pairs: Any) -> list[int]:
    """len(chosen) + len(rejected) of every pair of a datasets.Dataset, read from its Arrow list offsets (no token id
    is loaded: memory-mapped ids stay on disk)."""
    import pyarrow.compute as pc

    table = pairs.with_format("arrow")[:]
    return pc.add(pc.list_value_length(table["chosen_input_ids"]),
                  pc.list_value_length(table["rejected_input_ids"])).to_pylist()


def longest_sequence_tokens(pairs: Any) -> int:
    """The longest chosen or rejected sequence of a datasets.Dataset, from its Arrow list offsets."""
    import pyarrow.compute as pc

    table = pairs.with_format("arrow")[:]
    return max(pc.max(pc.list_value_length(table[column])).as_py() or 0
               for column in ("chosen_input_ids", "rejected_input_ids"))


def largest_micro_batch_tokens(pair_tokens: Sequence[int], batch_size: int, gradient_accumulation_steps: int,
                               max_tokens: int, packing: bool) -> int:
    """An upper bound on the tokens of this run's largest micro-batch, from its data (what activation memory is
    sized for; the max_tokens cap alone said 16k tokens where the default's micro-batches hold ~4k). Packed: one
    optimizer step's units on one process (batch x GA pairs), at most max_tokens unless one unit alone is larger.
    Plain: batch_size pairs, each row padded to at most the longest pair."""
    longest = heapq.nlargest(batch_size * gradient_accumulation_steps, pair_tokens)
    if not packing:
        return 2 * batch_size * longest[0]
    return min(sum(longest), max(max_tokens, sum(longest[:batch_size])))


def build_train_loader(train_set: Any, collator: Any, batch_size: int, gradient_accumulation_steps: int,
                       seed: int, packing: bool, max_tokens: int, num_processes: int,
                       on_cuda: bool, pair_tokens: Sequence[int],
                       packed_collator: PackedPairCollator | None = None) -> DataLoader:
    """The plain loader (one micro-batch of padded rows per `batch_size` pairs) or the packed one (pair_tokens:
    pair_token_counts of train_set; packed_collator: one with static shapes for CUDA graphs, else the plain one);
    both shuffled by the same seeded generator. On CUDA, two workers collate ahead into pinned memory."""
    generator = torch.Generator().manual_seed(seed)
    loading = {"num_workers": 2, "pin_memory": True, "persistent_workers": True} if on_cuda else {}
    if not packing:
        return DataLoader(train_set, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=generator,
                          **loading)
    sampler = PackedStepSampler(pair_tokens, batch_size, gradient_accumulation_steps, max_tokens,
                                num_processes, generator)
    return DataLoader(KeyedPairs(train_set), batch_sampler=sampler, collate_fn=packed_collator or PackedPairCollator(),
                      generator=generator,
                      **loading)  # the loader draws its worker seed from the generator too, as the plain one does
