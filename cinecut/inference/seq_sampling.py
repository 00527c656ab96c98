"""One frame's sampling: its own sampler chain and its own SceneDescription grammar, per sequence.

Each frame gets fresh samplers, as each ``create_chat_completion`` builds them, so a frame's answer
does not depend on which other frames share its batch. The grammar is consulted the way llama-server's
sampler does it: the chain picks a token from the raw logits, the grammar checks only that token, and
only when it refuses is the grammar applied to the whole vocabulary and the chain run again. Checking
one token instead of 32,000 is most of the sampling cost saved; with greedy sampling the token is the same.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from typing import Any, Final

from cinecut.inference.models import SCENE_DESCRIPTION_SCHEMA

#: Sampling as ``Llama.create_chat_completion`` through Llava15ChatHandler does it by default.
REPEAT_PENALTY: Final = 1.1
PENALTY_LAST_N: Final = 64
TOP_K: Final = 40
TOP_P: Final = 0.95
MIN_P: Final = 0.05
DEFAULT_TEMPERATURE: Final = 0.2


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The chain's settings; the defaults are llama-cpp-python's chat completion's."""

    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0
    repeat_penalty: float = REPEAT_PENALTY


class Vocabulary:
    """The model's vocabulary as sampling needs it: reusable candidate arrays, EOG, detokenizing.

    One per engine: the candidate arrays are shared by every sequence (sampling is one at a time).
    """

    def __init__(self, lc: Any, model: Any) -> None:
        import numpy as np

        self.lc = lc
        self.vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        assert dtype.itemsize == ctypes.sizeof(lc.llama_token_data)
        self._cand_buf = (lc.llama_token_data * self.n_vocab)()
        self.cand = np.frombuffer(self._cand_buf, dtype=dtype)
        self.cand_ptr = ctypes.cast(self._cand_buf, lc.llama_token_data_p)
        self._one_buf = (lc.llama_token_data * 1)()
        self.one = np.frombuffer(self._one_buf, dtype=dtype)
        self.one_ptr = ctypes.cast(self._one_buf, lc.llama_token_data_p)
        self.ids = np.arange(self.n_vocab, dtype=np.int32)
        from llama_cpp import llama_grammar

        grammar = llama_grammar.LlamaGrammar.from_json_schema(
            json.dumps(SCENE_DESCRIPTION_SCHEMA), verbose=False
        )
        self.grammar = (grammar._grammar.encode(), grammar._root.encode())

    def is_eog(self, token: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    def detokenize(self, tokens: list[int]) -> str:
        buf = ctypes.create_string_buffer(256)
        out = bytearray()
        for t in tokens:
            n = self.lc.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            if n > 0:
                out += buf.raw[:n]
        return out.decode("utf-8", "ignore")


class SequenceSampler:
    """One frame's sampler chain (penalties, top-k, typical, top-p, min-p, temperature, dist) and grammar."""

    def __init__(self, voc: Vocabulary, params: SamplingParams) -> None:
        lc = voc.lc
        self.voc = voc
        self.resamples = 0
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
        add(lc.llama_sampler_init_penalties(voc.n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
        else:
            add(lc.llama_sampler_init_top_k(TOP_K))
            add(lc.llama_sampler_init_typical(1.0, 1))
            add(lc.llama_sampler_init_top_p(TOP_P, 1))
            add(lc.llama_sampler_init_min_p(MIN_P, 1))
            add(lc.llama_sampler_init_temp(params.temperature))
            add(lc.llama_sampler_init_dist(params.seed))
        self.chain: Any = chain
        self.grammar: Any = lc.llama_sampler_init_grammar(voc.vocab, *voc.grammar)

    def sample(self, logits_ptr: Any) -> int:
        """The next token from one row of logits (a ``float*`` of n_vocab), accepted by chain and grammar."""
        import numpy as np

        voc, lc = self.voc, self.voc.lc
        logits = np.ctypeslib.as_array(logits_ptr, shape=(voc.n_vocab,))
        cand = voc.cand
        cand["id"] = voc.ids
        cand["logit"] = logits
        arr = lc.llama_token_data_array(voc.cand_ptr, voc.n_vocab, -1, False)
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
        token = int(cand["id"][arr.selected])
        one = voc.one
        one["id"] = token
        one["logit"] = 1.0
        one_arr = lc.llama_token_data_array(voc.one_ptr, 1, -1, False)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(one_arr))
        if not np.isfinite(one["logit"][0]):
            self.resamples += 1
            cand["id"] = voc.ids
            cand["logit"] = logits
            arr = lc.llama_token_data_array(voc.cand_ptr, voc.n_vocab, -1, False)
            lc.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
            token = int(cand["id"][arr.selected])
        lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        """Free both samplers (idempotent)."""
        for s in (self.chain, self.grammar):
            if s is not None:
                self.voc.lc.llama_sampler_free(s)
        self.chain = self.grammar = None
