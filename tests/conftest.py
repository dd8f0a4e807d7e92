"""Shared fixtures: small random-weight checkpoints in the published on-disk format, built once."""

import os
import signal

# No kernel is timed, so that a test's bf16 runs all use the same kernels (the tests of timing turn it on),
# and timed choices stay out of the user's cache; set before deepseek_vl2 is imported, which reads them.
os.environ["DEEPSEEK_VL2_KERNEL_TIMING"] = "0"
os.environ["DEEPSEEK_VL2_KERNEL_CACHE"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

from deepseek_vl2.testing.checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """``checkpoint_dir(variant)`` -> folder of a float32 built checkpoint (exact comparisons need fp32)."""
    built = {}

    def get(variant: str = "tiny"):
        if variant not in built:
            folder = tmp_path_factory.mktemp(f"ckpt-{variant}")
            built[variant] = build_checkpoint(folder, variant, seed=1234, dtype=torch.float32)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoint_dir):
    """``loaded(variant)`` -> (model in eval mode, processor), cached per variant."""
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

    cache = {}

    def get(variant: str = "tiny"):
        if variant not in cache:
            path = checkpoint_dir(variant)
            model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[variant] = (model, DeepseekVLV2Processor.from_pretrained(path))
        return cache[variant]

    return get


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt during the test, even where the run started with SIGINT ignored.

    A shell starts background jobs (``nohup pytest &``) with SIGINT ignored, and then
    ``_thread.interrupt_main()`` does nothing: a test that waits for its KeyboardInterrupt would hang.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def ram_for_two_layers(loaded):
    """``ram_for_two_layers(variant)`` -> a CPU budget in bytes for the float32 model's vision side, embeddings and
    about two decoder layers (plus the one layer accelerate keeps free to load an offloaded one): with it,
    ``device_map="auto"`` puts the rest of the decoder on disk."""
    from deepseek_vl2.planner import weight_bytes

    def get(variant: str = "tiny") -> int:
        model, _ = loaded(variant)
        sizes = weight_bytes(model)
        layers = model.language.model.layers
        layer = max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in layers)
        return sizes["vision"] + sizes["embeddings"] + 3 * layer

    return get


@pytest.fixture(scope="session")
def endless_checkpoint_dir(tmp_path_factory):
    """A float32 tiny checkpoint whose end-of-sentence logit is always 0: greedy answers run to max_new_tokens.

    For tests that need a generation still running when they act (a disconnect, a kill, a full queue).
    """
    import json

    from safetensors.torch import load_file, save_file

    from deepseek_vl2.models import DeepseekVLV2Processor

    path = build_checkpoint(tmp_path_factory.mktemp("ckpt-endless"), "tiny", seed=1234, dtype=torch.float32)
    name = "language.lm_head.weight"
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][DeepseekVLV2Processor.from_pretrained(path).tokenizer.eos_token_id] = 0.0
    save_file(tensors, shard, metadata={"format": "pt"})
    return path



@pytest.fixture
def fresh_timer(monkeypatch):
    """Kernel timing on (it is off in the other tests), with a timer, memo and step tunings of the test's own."""
    from deepseek_vl2.models import kernels
    from deepseek_vl2.models.kernel_timing import KernelTimer

    timer = KernelTimer(None)
    monkeypatch.setattr(kernels, "TIMER", timer)
    monkeypatch.setattr(kernels, "_timing", True)
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_tunings", {})
    return timer
