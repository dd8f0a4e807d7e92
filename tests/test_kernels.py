"""The per-device kernel choices: what ``choose`` answers, and how the chosen matrix-product kernel is run."""

import pytest
import torch

from deepseek_vl2.models.kernels import MAX_GATHERED_EXPERTS, MAX_PAIRS_IN_PLACE, Kernel, Op, choose, matmuls_on

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU is needed to ask
BF16 = torch.bfloat16


def test_one_row_products_on_cpu_run_on_pytorch_gemv():
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
