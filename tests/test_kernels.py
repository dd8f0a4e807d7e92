"""The per-device kernel choices: what ``choose`` answers, timed or by rule, and how the chosen kernel is run."""

import json
import time

import pytest
import torch

from deepseek_vl2.models import kernels
from deepseek_vl2.models.kernel_timing import KernelTimer, machine_key
from deepseek_vl2.models.kernels import (
    MAX_GATHERED_EXPERTS,
    MAX_PAIRS_IN_PLACE,
    Kernel,
    Op,
    choose,
    matmuls_on,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU is needed to ask
BF16 = torch.bfloat16


def test_untimed_one_row_products_on_cpu_run_on_pytorch_gemv():
    assert choose(Op.MATMUL, CPU, BF16, 1) is Kernel.NATIVE_GEMV
    assert choose(Op.MATMUL, CPU, BF16, 2) is Kernel.TORCH_DEFAULT
    assert choose(Op.MATMUL, CUDA, BF16, 1) is Kernel.TORCH_DEFAULT


def test_one_query_attention_runs_on_matmuls_on_cpu_only():
    assert choose(Op.ATTENTION, CPU, BF16, 1) is Kernel.ONE_QUERY
    assert choose(Op.ATTENTION, CPU, BF16, 2) is Kernel.SDPA
    assert choose(Op.ATTENTION, CUDA, BF16, 1) is Kernel.SDPA
    assert choose(Op.ONE_QUERY_SCORES, CPU, BF16, 1) is Kernel.NATIVE_GEMV
    assert choose(Op.ONE_QUERY_SCORES, CPU, BF16, 5) is Kernel.ONEDNN
    assert choose(Op.ONE_QUERY_VALUES, CPU, BF16, 1) is Kernel.ONEDNN
    assert choose(Op.LATENT_QUERY, CPU, BF16, 1) is Kernel.ONEDNN
    assert choose(Op.LATENT_QUERY, CUDA, BF16, 1) is Kernel.TORCH_DEFAULT


def test_experts_path_by_device_and_pairs():
    assert choose(Op.EXPERTS, CPU, BF16, MAX_PAIRS_IN_PLACE) is Kernel.EACH_PAIR
    assert choose(Op.EXPERTS, CPU, BF16, MAX_PAIRS_IN_PLACE + 1) is Kernel.SORTED
    assert choose(Op.EXPERTS, CUDA, BF16, MAX_GATHERED_EXPERTS) is Kernel.GATHERED
    assert choose(Op.EXPERTS, CUDA, BF16, MAX_GATHERED_EXPERTS + 1) is Kernel.SORTED


@pytest.fixture
def onednn_as_the_user_set_it():
    setting = torch.backends.mkldnn.enabled
    yield
    torch.backends.mkldnn.enabled = setting


@pytest.mark.parametrize("user_setting", [True, False])
def test_matmul_kernels_switch_onednn_and_restore_the_users_setting(user_setting, onednn_as_the_user_set_it):
    torch.backends.mkldnn.enabled = user_setting
    for kernel, inside in [(Kernel.NATIVE_GEMV, False), (Kernel.ONEDNN, True), (Kernel.TORCH_DEFAULT, user_setting)]:
        with matmuls_on(kernel):
            assert torch.backends.mkldnn.enabled is inside, kernel
        assert torch.backends.mkldnn.enabled is user_setting


def test_only_matmul_kernels_run_matrix_products():
    with pytest.raises(ValueError, match="not a matrix-product kernel"):
        matmuls_on(Kernel.SDPA)


CANDIDATES = (Kernel.TORCH_DEFAULT, Kernel.NATIVE_GEMV)


def sleeping(seconds: dict):
    """A trial that takes ``seconds[kernel]``, and the list of the kernels it ran."""
    ran = []

    def trial(kernel):
        ran.append(kernel)
        time.sleep(seconds[kernel])

    return trial, ran


def measure_with(trial):
    return lambda: kernels.time_candidates(CANDIDATES, trial)


def test_the_clearly_faster_candidate_is_chosen_and_remembered():
    timer = KernelTimer(None)
    trial, ran = sleeping({Kernel.TORCH_DEFAULT: 0.02, Kernel.NATIVE_GEMV: 0.002})
    assert timer.choose("k", CANDIDATES, measure_with(trial)) is Kernel.NATIVE_GEMV
    assert set(ran) == set(CANDIDATES) and len(ran) >= 4, "each candidate warmed up, then timed"
    assert timer.choose("k", CANDIDATES, lambda: pytest.fail("timed twice")) is Kernel.NATIVE_GEMV
    (measurement,) = timer.measurements
    assert measurement.chosen == "native_gemv" and measurement.seconds["torch_default"] > 0.02


def test_within_the_margin_the_originals_call_is_kept():
    trial, _ = sleeping({Kernel.TORCH_DEFAULT: 0.01, Kernel.NATIVE_GEMV: 0.0095})
    assert KernelTimer(None).choose("k", CANDIDATES, measure_with(trial)) is Kernel.TORCH_DEFAULT


def test_choices_are_kept_on_disk_per_machine(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"another machine": {"k": "torch_default"}}))
    trial, _ = sleeping({Kernel.TORCH_DEFAULT: 0.02, Kernel.NATIVE_GEMV: 0.002})
    assert KernelTimer(path).choose("k", CANDIDATES, measure_with(trial)) is Kernel.NATIVE_GEMV
    stored = json.loads(path.read_text())
    assert stored == {"another machine": {"k": "torch_default"}, machine_key(): {"k": "native_gemv"}}
    later = KernelTimer(path)  # another process on this machine
    assert later.choose("k", CANDIDATES, lambda: pytest.fail("timed again")) is Kernel.NATIVE_GEMV
    assert later.measurements == []


def test_an_unreadable_choices_file_is_timed_again_and_rewritten(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    trial, ran = sleeping({Kernel.TORCH_DEFAULT: 0.001, Kernel.NATIVE_GEMV: 0.02})
    assert KernelTimer(path).choose("k", CANDIDATES, measure_with(trial)) is Kernel.TORCH_DEFAULT
    assert ran and json.loads(path.read_text()) == {machine_key(): {"k": "torch_default"}}


@pytest.fixture
def fresh_timer(monkeypatch):
    """``kernels`` with a timer and memo of its own, so that the test sees its own timings."""
    timer = KernelTimer(None)
    monkeypatch.setattr(kernels, "TIMER", timer)
    monkeypatch.setattr(kernels, "_chosen", {})
    return timer


def test_a_trial_on_the_callers_operands_is_timed_once(fresh_timer):
    trial, ran = sleeping({Kernel.SORTED: 0.02, Kernel.EACH_PAIR: 0.002})
    assert choose(Op.EXPERTS, CPU, BF16, 6, [(64, 32)], trial=trial) is Kernel.EACH_PAIR
    assert choose(Op.EXPERTS, CPU, BF16, 6, [(64, 32)], trial=pytest.fail) is Kernel.EACH_PAIR
    (measurement,) = fresh_timer.measurements
    assert measurement.key.startswith("experts bfloat16 size 6 shapes [(64, 32)]") and len(ran) >= 4


def test_rules_decide_where_nothing_is_timed(fresh_timer):
    shapes = [(64, 32)]
    assert choose(Op.EXPERTS, CPU, torch.float32, 6, shapes, trial=pytest.fail) is Kernel.EACH_PAIR
    assert choose(Op.EXPERTS, CPU, BF16, MAX_PAIRS_IN_PLACE + 1, shapes, trial=pytest.fail) is Kernel.SORTED
    assert choose(Op.EXPERTS, CUDA, BF16, 6, shapes, trial=pytest.fail) is Kernel.GATHERED
    assert choose(Op.EXPERTS, CPU, BF16, 6) is Kernel.EACH_PAIR  # no trial: nothing to time
    assert choose(Op.MATMUL, CPU, BF16, 1, shapes, trial=pytest.fail) is Kernel.NATIVE_GEMV  # products: by rule
    kernels.time_kernels(False)
    try:
        assert choose(Op.EXPERTS, CPU, BF16, 12, shapes, trial=pytest.fail) is Kernel.EACH_PAIR
    finally:
        kernels.time_kernels(True)
    assert fresh_timer.measurements == []
