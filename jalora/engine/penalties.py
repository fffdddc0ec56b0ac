"""Where the draw finds each penalized request's token counts: one row per slot of a device table (and the
tokens a request with allowed_token_ids may not draw, as a flag in the same row).

Penalties (presence, frequency, repetition) need, per request, how many times it generated each token and
which tokens its prompt holds. Sending them with every step would cost a vocabulary-wide row per request
per step, and under async scheduling the host does not even know the token sampled by the step still on
the device. So the counts live on the device, in an i32[max_num_seqs, V] table
(`ModelRunner.penalty_counts`): a penalized request holds a slot (a row), the draw reads the rows of its
penalized requests and adds each drawn token to its request's row, and the host writes a row whole only
when a request takes a slot (or its row cannot be trusted).

This class is the host's book of the table: which request owns each slot, and how many of its output
tokens the row counts. A request whose row counts anything but its tokens so far (with the one pending
on the device: `Request.num_output_tokens_with_pending`) gets its row written again from the host's
tokens, the pending one added on the device. That covers, with one rule, a request's first step, a
request that lost its slot to another, and steps dropped after they counted a token (their requests
recompute those tokens, `StepPipeline.drop`). A slot goes to a new request from the least recently used
of those whose request is not in the step (a batch has at most max_num_seqs requests, so one is always
free); a finished request's slot is simply the first to be taken.
"""

import dataclasses

import numpy as np

from jalora.engine.request import Status
from jalora.model.sampler import DISALLOWED_FLAG, PROMPT_FLAG


def counts_row(prompt_token_ids, output_token_ids, vocab_size: int, allowed_token_ids=None) -> np.ndarray:
    """i32[vocab_size]: each token's count among `output_token_ids`, PROMPT_FLAG added where it is in the
    prompt, and with `allowed_token_ids` DISALLOWED_FLAG added to every other token (ids outside the vocabulary
    are not counted: the model never draws them)."""
    out = np.asarray(output_token_ids, np.int64)
    row = np.bincount(out[(out >= 0) & (out < vocab_size)], minlength=vocab_size).astype(np.int32)
    prompt = np.asarray(prompt_token_ids, np.int64)
    row[np.unique(prompt[(prompt >= 0) & (prompt < vocab_size)])] += PROMPT_FLAG
    if allowed_token_ids is not None:
        disallowed = np.full(vocab_size, DISALLOWED_FLAG, np.int32)
        disallowed[np.asarray(allowed_token_ids, np.int64)] = 0
        row += disallowed
    return row


@dataclasses.dataclass(frozen=True)
class RowWrite:
    """A table row to write before a step's draw: `row` into `slot`, plus one for the token that the
    previous step sampled in its row `pending_row` (-1: none)."""

    slot: int
    row: np.ndarray  # i32[V]
    pending_row: int


class PenaltySlots:
    def __init__(self, num_slots: int, vocab_size: int):
        self.vocab_size = vocab_size
        self._owner: list[object | None] = [None] * num_slots
        self._counted = [0] * num_slots  # output tokens (pending ones too) that the slot's row counts
        self._used = [0] * num_slots  # the step that last used each slot (least recent goes first)
        self._slot_of: dict[int, int] = {}  # id(request) -> slot (checked against _owner)
        self._clock = 0

    def slot(self, req, in_step: set[int], writes: list[RowWrite]) -> int:
        """`req`'s slot for this step (`in_step`: the ids of the step's requests), with a row write queued in
        `writes` where its row does not count exactly its tokens so far."""
        self._clock += 1
        slot = self._slot_of.get(id(req))
        if slot is None or self._owner[slot] is not req:
            free = [s for s in range(len(self._owner)) if self._owner[s] is None or id(self._owner[s]) not in in_step]
            slot = min(free, key=lambda s: (self._taken(s), self._used[s]))
            if self._owner[slot] is not None:
                del self._slot_of[id(self._owner[slot])]
            self._owner[slot], self._slot_of[id(req)] = req, slot
            self._counted[slot] = -1  # (written below)
        self._used[slot] = self._clock
        if self._counted[slot] != req.num_output_tokens_with_pending:
            # (at most one pending token, sampled by the previous step: ModelRunner.prepare checks that)
            pending = req.pending[0][1] if req.pending else -1
            row = counts_row(req.prompt_token_ids, req.output_token_ids, self.vocab_size, req.params.allowed_token_ids)
            writes.append(RowWrite(slot, row, pending))
            self._counted[slot] = req.num_output_tokens_with_pending
        return slot

    def _taken(self, slot: int) -> bool:
        """The slot's row belongs to a request that may still draw (a free slot or a finished request's goes
        first)."""
        owner = self._owner[slot]
        return owner is not None and owner.status is not Status.FINISHED

    def counted(self, slot: int) -> None:
        """The step's draw adds the token it samples for the slot's request to its row."""
        self._counted[slot] += 1

    def forget(self) -> None:
        """Trust no row (a launch failed: its row writes or its draw's counts may or may not have landed)."""
        self._owner = [None] * len(self._owner)
        self._slot_of.clear()
