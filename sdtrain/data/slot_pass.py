"""One slot's shuffled pass over its samples, with a state small enough to report with every batch.

A slot (one worker of one rank, see partition.py) reads the samples the epoch plan gave it in file order: the
*source*, numbered 0..n-1. Which number leaves the shuffle buffer next depends only on n, the buffer size and
the seeded generator, never on the samples, so `ShuffleOrder` runs the buffer on the numbers alone (exactly as
`shuffle_buffer` would on the samples) and its state is the buffer's numbers, the next source number and the
generator state. Reading is driven by that order (`ordered_pass`). To continue from a saved state, only the
samples whose numbers are in the buffer (at most its size, from the last few thousand of the source) are read
again (`read_window`: the payloads of the others are seeked past), then reading goes on sequentially, so the
first batch after a resume costs the same at 5% and at 95% of an epoch (bench/resume.py).

`StreamPosition` is what a worker reports with every batch and what checkpoints keep: the order's state plus the
samples waiting in the aspect buckets, by source number. From all slots' positions the samples an epoch still
owes are known exactly (elastic.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

Raw = dict[str, Any]
# read(begin, wanted) yields (source number, raw sample) from `begin` on, in order, for the numbers `wanted` takes
SourceReader = Callable[[int, Callable[[int], bool] | None], Iterator[tuple[int, Raw]]]


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where one worker's stream stands right after it emitted a batch; the next batch continues from here."""

    epoch: int
    emitted: int  # batches of this epoch emitted so far, the last one included
    cycle: int  # pass over the slot's samples (> 0 only when bad samples made the slot read its samples again)
    order: dict[str, Any]  # ShuffleOrder.state() of this pass
    pending: tuple[int, ...]  # source numbers of checked samples waiting in the buckets, in arrival order
    epoch_reads: int = 0  # samples read this epoch (all passes) and how many of them were bad: the skip-rate check
    epoch_bad: int = 0
    worker: int = 0  # the worker role that reported it

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pending": list(self.pending)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        return cls(**{**data, "pending": tuple(data["pending"])})

    def unread(self, num_samples: int) -> set[int]:
        """Source numbers of the pass that no emitted batch holds: in the buffer, waiting, or not read yet."""
        order = self.order
        return set(order["buffer"]) | set(self.pending) | set(range(order["next"], num_samples))


class Reported:
    """A batch's StreamPosition as it travels with the batch. The DataLoader's conversion and pinning and
    Lightning's precision casts walk every list, dict and dataclass of a batch (~0.5 ms a batch for a buffer's
    worth of numbers; a frozen dataclass is an error); an object of a plain class goes through untouched."""

    __slots__ = ("position",)

    def __init__(self, position: StreamPosition) -> None:
        self.position = position


def shuffle_buffer(source: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset-style buffered shuffle of a finite stream; drains the buffer at the end."""
    if size <= 1:
        yield from source
        return
    buffer = list(islice(source, size))
    for item in source:
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShuffleOrder:
    """`shuffle_buffer` over the numbers 0..n-1, one at a time, with a state to save and continue from."""

    def __init__(self, num_samples: int, size: int, rng: random.Random, state: dict[str, Any] | None = None) -> None:
        self.num_samples, self.size, self.rng = num_samples, size if size > 1 else 0, rng
        if state is None:
            self.buffer = list(range(min(num_samples, self.size)))
            self.next, self.draining = len(self.buffer), False
        else:
            self.buffer, self.next, self.draining = list(state["buffer"]), state["next"], state["draining"]
            version, internal, gauss = state["rng"]
            rng.setstate((version, tuple(internal), gauss))

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if not self.size:  # no buffer: file order
            if self.next >= self.num_samples:
                raise StopIteration
            self.next += 1
            return self.next - 1
        if not self.draining and self.next < self.num_samples:
            i = self.rng.randrange(len(self.buffer))
            out, self.buffer[i] = self.buffer[i], self.next
            self.next += 1
            return out
        if not self.draining:  # the source is exhausted: shuffle_buffer shuffles what is left and yields it
            self.rng.shuffle(self.buffer)
            self.buffer.reverse()  # popped from the end
            self.draining = True
        if not self.buffer:
            raise StopIteration
        return self.buffer.pop()

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "buffer": list(self.buffer),
            "next": self.next,
            "draining": self.draining,
            "rng": [version, list(internal), gauss],
        }


def read_window(read: SourceReader, numbers: set[int]) -> dict[int, Raw]:
    """The samples with these source numbers (already read once), reading only their span sparsely."""
    if not numbers:
        return {}
    last = max(numbers)
    found: dict[int, Raw] = {}
    for number, raw in read(min(numbers), numbers.__contains__):
        found[number] = raw
        if number >= last:
            break
    return found


def ordered_pass(
    read: SourceReader, order: Iterator[int], window: dict[int, Raw], begin: int
) -> Iterator[tuple[int, Raw | None]]:
    """(source number, sample) in the order's sequence, the sample None where the source no longer has it (a
    truncated or unreadable shard, already reported by the reader). `window` holds the samples read before
    `begin`, the source number from which reading goes on sequentially; at most a buffer's worth are held."""
    held = window
    source = read(begin, None)
    next_number = begin
    for number in order:
        while number not in held and next_number <= number:
            item = next(source, None)
            if item is None:
                next_number = 1 << 62
                break
            held[item[0]] = item[1]
            next_number = item[0] + 1
        yield number, held.pop(number, None)
