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

    @rule(data=st.data(), layers=st.sets(st.integers(0, LAYERS - 1), min_size=1))
    def static_pass(self, data, layers):
        """A static pass's books: one claim over several layers (which then share one list of lengths, as a round's
        layers do), then a write per layer at host-unknown positions (`Step.starts` None), as a replayed graph's."""
        shortest = min(len(self.model[layer]) for layer in layers)
        start = data.draw(st.integers(0, min(shortest, CAPACITY - 1)), label="start")
        q = data.draw(st.integers(1, CAPACITY - start), label="q")
        self.cache.claim(sorted(layers), [start], q)
        for layer in sorted(layers):
            keys = [self.counter + i for i in range(q)]
            self.counter += q
            key = torch.tensor(keys, dtype=torch.float64).view(1, 1, q, 1).expand(1, HEADS, q, DIM)
            step = Step(positions=torch.arange(start, start + q).unsqueeze(0), starts=None)
            self.cache.write(layer, step, key, -key)
            self.model[layer] = self.model[layer][:start] + [(k, -k) for k in keys]

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


def test_a_claim_refuses_the_first_fault_layer_by_layer_and_row_by_row():
    """A claim over many layers and rows names the first (layer, row) at fault, and changes no books when it refuses."""
    cache = KVCache(num_layers=3, batch=2, num_kv_heads=1, max_len=8, head_dim=1, dtype=torch.float32, device="cpu")
    cache.claim(range(3), [0, 0], 5)
    cache.rollback([3, 1], layers=[1])  # layer 1 row 1 now holds 1 position
    before = [list(lengths) for lengths in cache.lengths]
    with pytest.raises(ValueError, match="layer 1 row 1: write at position 5 would leave a gap"):
        cache.claim(range(3), [3, 5], 1)
    with pytest.raises(ValueError, match="overflow: positions up to 8"):
        cache.claim([0, 2], [3, 5], 4)
    assert cache.lengths == before
    cache.claim([0, 2], [3, 5], 3)
    assert cache.lengths == [[6, 8], [3, 1], [6, 8]]
    cache.rollback([4, 6], layers=[0])  # layers 0 and 2 shared one list: only layer 0's is rolled back
    assert cache.lengths == [[4, 6], [3, 1], [6, 8]]
