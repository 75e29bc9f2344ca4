"""Stateful test of the KV cache against a plain list model: writes by position, rollback, per-layer lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from executor.adapter import Step
from executor.kv_cache import KVCache

LAYERS, HEADS, DIM, CAPACITY = 3, 2, 2, 24


class CacheMachine(RuleBasedStateMachine):
    """The model: per layer, a list of the (key, value) scalars written at positions 0 .. length-1."""

    @initialize()
    def setup(self):
        self.cache = KVCache(
            num_layers=LAYERS, batch=1, num_kv_heads=HEADS, max_len=CAPACITY, head_dim=DIM,
            dtype=torch.float64, device="cpu",
        )  # fmt: skip
        self.model: list[list[tuple[float, float]]] = [[] for _ in range(LAYERS)]
        self.counter = 0.0

    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1))
    def write(self, data, layer):
        length = len(self.model[layer])
        start = data.draw(st.integers(0, min(length, CAPACITY - 1)), label="start")
        q = data.draw(st.integers(1, CAPACITY - start), label="q")
        keys = [self.counter + i for i in range(q)]
        self.counter += q
        key = torch.tensor(keys, dtype=torch.float64).view(1, 1, q, 1).expand(1, HEADS, q, DIM)
        self.cache.write(layer, Step.at(start, q, "cpu"), key, -key)
        self.model[layer] = self.model[layer][:start] + [(k, -k) for k in keys]

    @precondition(lambda self: any(len(m) < CAPACITY for m in self.model))
    @rule(data=st.data(), layer=st.integers(0, LAYERS - 1))
    def write_with_gap_is_refused(self, data, layer):
        length = len(self.model[layer])
        if length + 1 >= CAPACITY:
            return
        start = data.draw(st.integers(length + 1, CAPACITY - 1), label="gap start")
        with pytest.raises(ValueError, match="gap"):
            self.cache.write(
                layer, Step.at(start, 1, "cpu"), torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM)
            )

    @rule(length=st.integers(0, CAPACITY), layers=st.none() | st.sets(st.integers(0, LAYERS - 1)))
    def rollback(self, length, layers):
        self.cache.rollback(length, layers=layers)
        for layer in range(LAYERS) if layers is None else layers:
            self.model[layer] = self.model[layer][:length]

    @invariant()
    def matches_model(self):
        for layer, entries in enumerate(self.model):
            assert self.cache.lengths[layer] == [len(entries)]
            keys, values = self.cache.view(layer, len(entries))
            assert keys[0, :, :, 0].tolist() == [[k for k, _ in entries]] * HEADS
            assert values[0, :, :, 1].tolist() == [[v for _, v in entries]] * HEADS


TestKVCache = CacheMachine.TestCase


def test_overflow_and_negative_rollback_are_refused():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=1, max_len=4, head_dim=1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="overflow"):
        cache.write(0, Step.at(0, 5, "cpu"), torch.zeros(1, 1, 5, 1), torch.zeros(1, 1, 5, 1))
    with pytest.raises(ValueError, match=">= 0"):
        cache.rollback(-1)


def test_buffers_are_never_reallocated():
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=1, max_len=8, head_dim=2, dtype=torch.float32, device="cpu")
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    cache.write(0, Step.at(0, 3, "cpu"), torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    cache.rollback(1)
    cache.write(0, Step.at(1, 4, "cpu"), torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    assert [t.data_ptr() for t in cache.keys + cache.values] == pointers
