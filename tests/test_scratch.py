"""Scratch tensors: one per role inside a pass, kept from layer to layer, new ones outside."""

import contextlib
import threading

import torch
from test_language import make_model, random_ids

import deepseek_vl2.models.language as language
from deepseek_vl2.models.kernels import MAX_PAIRS_IN_PLACE
from deepseek_vl2.models.scratch import reusing_scratch, scratch

CPU = torch.device("cpu")


def test_inside_a_pass_a_role_gets_the_same_memory_and_outside_a_new_tensor():
    with reusing_scratch():
        first = scratch("a", (4, 8), torch.float32, CPU)
        assert scratch("a", (4, 8), torch.float32, CPU).data_ptr() == first.data_ptr()
        assert scratch("b", (4, 8), torch.float32, CPU).data_ptr() != first.data_ptr()
        with reusing_scratch():  # a nested pass shares the outer one's
            assert scratch("a", (4, 8), torch.float32, CPU).data_ptr() == first.data_ptr()
        assert scratch("a", (4, 8), torch.float32, CPU).data_ptr() == first.data_ptr()
        assert scratch("a", (5, 8), torch.float32, CPU).shape == (5, 8)
        assert scratch("a", (5, 8), torch.bfloat16, CPU).dtype == torch.bfloat16
    outside = [scratch("a", (4, 8), torch.float32, CPU) for _ in range(2)]
    assert outside[0].data_ptr() != outside[1].data_ptr()


def test_only_host_memory_is_kept():
    meta = torch.device("meta")  # as an accelerator: its allocator reuses blocks by itself
    with reusing_scratch():
        assert scratch("a", (4, 8), torch.float32, meta) is not scratch("a", (4, 8), torch.float32, meta)


def test_each_thread_keeps_its_own():
    seen = {}

    def run(name):
        with reusing_scratch():
            seen[name] = scratch("a", (64, 64), torch.float32, CPU)
            barrier.wait()  # both hold theirs at once

    barrier = threading.Barrier(2, timeout=10)
    threads = [threading.Thread(target=run, args=(name,)) for name in "xy"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert seen["x"].data_ptr() != seen["y"].data_ptr()


def test_a_prefill_writes_every_moe_layers_pair_outputs_into_one_buffer(monkeypatch):
    model = make_model()  # two MoE layers after a dense one
    buffers = []

    def spy(*args):
        buffers.append(language_scratch(*args))
        return buffers[-1]

    language_scratch = language.scratch
    monkeypatch.setattr(language, "scratch", spy)
    tokens = MAX_PAIRS_IN_PLACE // model.config.num_experts_per_tok + 8  # past a decode batch's pairs
    ids = random_ids(1, tokens)  # each expert once on its sorted segment
    with torch.no_grad():
        logits = model(ids).logits
    assert len(buffers) == 2 and buffers[0].data_ptr() == buffers[1].data_ptr()
    monkeypatch.setattr(language, "reusing_scratch", contextlib.nullcontext)  # a new buffer in every layer
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert len(buffers) == 4
