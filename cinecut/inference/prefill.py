"""Prompt and image prefill: several frames' prompts into their own sequences, in as few decodes as fit.

The text before the image (system message, ``USER:``) is the same for every frame: it is evaluated
once, into a sequence of its own, and each frame's sequence starts as a copy of it (llama-server's
``cache_prompt`` gets the same saving from its slot's cache). What follows depends on the image, so it
is evaluated per frame, but not one frame at a time: the image rows of every frame being admitted go
into shared ``llama_decode`` calls of up to N_BATCH rows, then their texts likewise. On a CPU a
64-token decode is far from the speed of a 256-token one, so admitting frames together is what makes
the prompt cheap; each frame still attends only to its own sequence, so its answer is unchanged.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from cinecut.inference.engine import _native_errors
from cinecut.inference.frame_feed import Prepared
from cinecut.inference.seqcontext import N_BATCH, DecodeFailed, SequenceContext

log = logging.getLogger(__name__)

#: Called with (item index, batch row of its last logits, its position after the prompt) as soon as
#: an item's prompt is complete.
OnReady = Callable[[int, int, int], None]
#: A prompt's parts as the frame feeder gives them: ("text", tokens, None) | ("image", chunk, embeddings).
Parts = list[tuple[str, Any, Any]]


class Prefiller:
    """Evaluates prompts into sequences, sharing the constant prefix held in ``prefix_seq``."""

    def __init__(self, sc: SequenceContext, prefix_tokens: list[int], prefix_seq: int) -> None:
        self.sc = sc
        self.prefix_seq = prefix_seq
        self.prefix_tokens = list(prefix_tokens)
        #: Seconds spent evaluating prompts (main thread, not overlapped).
        self.prefill_s = 0.0
        if self.prefix_tokens:
            try:
                sc.decode([(t, i, prefix_seq, False) for i, t in enumerate(self.prefix_tokens)])
            except DecodeFailed as exc:
                log.warning(
                    "the shared prompt prefix could not be evaluated (%s): each frame evaluates it", exc
                )
                self.prefix_tokens = []

    def prefill(self, items: list[tuple[int, Prepared]], on_ready: OnReady) -> None:
        """Evaluate each (sequence, prepared frame)'s prompt, starting from the shared prefix's copy.

        ``on_ready`` runs right after the decode that produced an item's last logits (the next decode
        overwrites them). DecodeFailed leaves the items' sequences to be dropped by the caller.
        """
        plan: list[tuple[int, Parts, int]] = []
        for seq, prepared in items:
            parts, n_past = prepared.parts, 0
            if (
                self.prefix_tokens
                and len(parts) > 1
                and parts[0][0] == "text"
                and parts[0][1] == self.prefix_tokens
            ):
                self.sc.copy_seq(self.prefix_seq, seq)
                n_past = len(self.prefix_tokens)
                parts = parts[1:]
            plan.append((seq, parts, n_past))
        self.evaluate(plan, on_ready)

    def evaluate(self, plan: list[tuple[int, Parts, int]], on_ready: OnReady) -> None:
        """Evaluate (sequence, prompt parts, first position) items, those of the same shape together."""
        started = time.perf_counter()
        try:
            seqs = [seq for seq, _, _ in plan]
            rest = [parts for _, parts, _ in plan]
            n_past = [n for _, _, n in plan]
            if any(not parts or parts[-1][0] != "text" for parts in rest):
                raise DecodeFailed("the prompt does not end in text")
            # Frames whose remaining parts have the same kinds and lengths advance part by part together.
            groups: dict[tuple[tuple[str, int], ...], list[int]] = {}
            for i, parts in enumerate(rest):
                groups.setdefault(tuple((k, self._length(k, p)) for k, p, _ in parts), []).append(i)
            for members in groups.values():
                n_parts = len(rest[members[0]])
                for k in range(n_parts):
                    if rest[members[0]][k][0] == "text":
                        self._text(seqs, rest, members, k, n_past, on_ready if k == n_parts - 1 else None)
                    else:
                        self._images(seqs, rest, members, k, n_past)
        finally:
            self.prefill_s += time.perf_counter() - started

    def _length(self, kind: str, payload: Any) -> int:
        return len(payload) if kind == "text" else int(self.sc.mt.mtmd_input_chunk_get_n_tokens(payload))

    def _text(
        self,
        seqs: list[int],
        rest: list[Parts],
        members: list[int],
        k: int,
        n_past: list[int],
        on_ready: OnReady | None,
    ) -> None:
        per_item = []
        for i in members:
            tokens: list[int] = rest[i][k][1]
            seq, last = seqs[i], len(tokens) - 1
            per_item.append(
                [(t, n_past[i] + j, seq, on_ready is not None and j == last, i) for j, t in enumerate(tokens)]
            )
            n_past[i] += len(tokens)
        for call in _calls(per_item):
            self.sc.decode([(t, pos, seq, lg) for t, pos, seq, lg, _ in call])
            if on_ready is not None:
                for row, (_, _, _, lg, i) in enumerate(call):
                    if lg:
                        on_ready(i, row, n_past[i])

    def _images(
        self,
        seqs: list[int],
        rest: list[Parts],
        members: list[int],
        k: int,
        n_past: list[int],
    ) -> None:
        sc, mt = self.sc, self.sc.mt
        batched: list[list[tuple[Any, int, int, int]]] = []
        for i in members:
            _, chunk, embd = rest[i][k]
            seq, n_tok = seqs[i], int(mt.mtmd_input_chunk_get_n_tokens(chunk))
            if sc.can_batch_image(chunk):
                batched.append([(embd, r, n_past[i] + r, seq) for r in range(n_tok)])
                n_past[i] += n_tok
                continue
            new_n_past = sc.lc.llama_pos(0)
            rc = mt.mtmd_helper_decode_image_chunk(
                sc.mtmd, sc.ctx, chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_past[i], seq,
                N_BATCH, ctypes.byref(new_n_past), mt.mtmd_helper_post_decode_callback(), None,
            )  # fmt: skip
            if rc != 0:
                raise DecodeFailed(f"image decode returned {rc} ({_native_errors()})")
            n_past[i] = new_n_past.value
        for call in _calls(batched):
            runs: list[tuple[Any, int, int, int, int]] = []
            for embd, r, pos, seq in call:  # consecutive rows of one frame make one run
                if runs and runs[-1][0] is embd and runs[-1][1] + runs[-1][2] == r:
                    e, first, count, pos0, s = runs[-1]
                    runs[-1] = (e, first, count + 1, pos0, s)
                else:
                    runs.append((embd, r, 1, pos, seq))
            sc.decode_embd(runs)


def _calls(per_item: list[list[Any]]) -> Iterator[list[Any]]:
    """Pack whole items into calls of at most N_BATCH entries; an item longer than that is split."""
    call: list[Any] = []
    for entries in per_item:
        if len(entries) > N_BATCH:
            if call:
                yield call
                call = []
            for start in range(0, len(entries), N_BATCH):
                yield entries[start : start + N_BATCH]
        elif len(call) + len(entries) > N_BATCH:
            yield call
            call = list(entries)
        else:
            call += entries
    if call:
        yield call
