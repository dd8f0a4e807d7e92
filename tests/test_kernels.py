"""The per-device kernel choices: what ``choose`` answers, timed or by rule, and how the chosen kernel is run."""

import json
import time

import pytest
import torch

from test_language import CONFIGS, make_model, random_ids

from deepseek_vl2.models import kernels
from deepseek_vl2.models.cache import DeepseekV2Cache
from deepseek_vl2.models.kernel_timing import STEP_ORDER, KernelTimer, StepTuning, machine_key
from deepseek_vl2.models.kernels import (
    MAX_GATHERED_EXPERTS,
    MAX_PAIRS_IN_PLACE,
    MIN_DEQUANTIZED_ROWS,
    Kernel,
    Op,
    choose,
    key_length_class,
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
    assert choose(Op.EXPERTS, CPU, BF16, MAX_PAIRS_IN_PLACE) is Kernel.EACH_EXPERT
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


def test_a_trial_on_the_callers_operands_is_timed_once(fresh_timer):
    trial, ran = sleeping({Kernel.WEIGHT_ONLY: 0.02, Kernel.DEQUANTIZED: 0.002})
    size = MIN_DEQUANTIZED_ROWS
    assert choose(Op.QUANTIZED_PRODUCT, CPU, BF16, size, [(64, 32)], trial=trial) is Kernel.DEQUANTIZED
    assert choose(Op.QUANTIZED_PRODUCT, CPU, BF16, size, [(64, 32)], trial=pytest.fail) is Kernel.DEQUANTIZED
    (measurement,) = fresh_timer.measurements
    assert measurement.key.startswith(f"quantized_product size {size} shapes [(64, 32)] bfloat16") and len(ran) >= 4


def test_rules_decide_where_nothing_is_timed(fresh_timer):
    shapes, size = [(64, 32)], MIN_DEQUANTIZED_ROWS
    assert choose(Op.QUANTIZED_PRODUCT, CPU, torch.float32, size, shapes, trial=pytest.fail) is Kernel.WEIGHT_ONLY
    assert choose(Op.QUANTIZED_PRODUCT, CPU, BF16, size - 1, shapes, trial=pytest.fail) is Kernel.WEIGHT_ONLY
    assert choose(Op.QUANTIZED_PRODUCT, CUDA, BF16, size, shapes, trial=pytest.fail) is Kernel.WEIGHT_ONLY
    assert choose(Op.QUANTIZED_PRODUCT, CPU, BF16, size) is Kernel.WEIGHT_ONLY  # no trial: nothing to time
    assert choose(Op.EXPERTS, CPU, BF16, 6) is Kernel.EACH_EXPERT  # outside a decode step: the rule
    assert choose(Op.MATMUL, CPU, BF16, 1, shapes, trial=pytest.fail) is Kernel.NATIVE_GEMV
    kernels.time_kernels(False)
    assert choose(Op.QUANTIZED_PRODUCT, CPU, BF16, 2 * size, shapes, trial=pytest.fail) is Kernel.WEIGHT_ONLY
    assert fresh_timer.measurements == []


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_steps(tuning, seconds_by_answer, steps, around=0.0, asks=lambda step: True):
    """``steps`` steps whose block asks ``q`` (rule "a", other "b") and takes the time given for its answer,
    with ``around(step)`` seconds of the step's other work before and after it; steps where ``asks(step)``
    is false do not ask ``q``. The answers the blocks got."""
    clock = tuning.clock = FakeClock()
    answers = []
    for step in range(steps):
        tuning.step_started()
        clock.now += around
        if asks(step):
            with tuning.answering("q", "a", "b") as answer:
                clock.now += seconds_by_answer[answer]
            answers.append(answer)
        clock.now += around
        tuning.step_done()
    return answers


def test_a_question_is_settled_on_interleaved_steps_and_kept():
    timer = KernelTimer(None)
    tuning = StepTuning(timer, "steps: ")
    answers = run_steps(tuning, {"a": 10.0, "b": 8.0}, 1 + len(STEP_ORDER) + 2)
    assert answers == ["a"] + ["ab"[i] for i in STEP_ORDER] + ["b", "b"], "the rule first, then both in turn"
    assert tuning.done and timer.choices() == {"steps: q": "b"}
    (measurement,) = tuning.measurements
    assert measurement.seconds == {"a": 10.0, "b": 8.0}
    again = StepTuning(timer, "steps: ")  # a later process on this machine
    assert run_steps(again, {"a": 0.0, "b": 0.0}, 2) == ["b", "b"] and again.measurements == []


def test_a_block_time_within_the_margin_keeps_the_rule():
    tuning = StepTuning(KernelTimer(None), "steps: ")
    run_steps(tuning, {"a": 10.0, "b": 9.5}, 1 + len(STEP_ORDER))
    assert tuning.settled == {"q": "a"}


def test_only_the_questions_own_blocks_are_timed():
    """The rest of a step (here growing by far more than the blocks differ) does not count, nor do steps
    that never ran the question's op."""
    tuning = StepTuning(KernelTimer(None), "steps: ")
    answers = run_steps(tuning, {"a": 10.0, "b": 8.0}, 1 + 2 * len(STEP_ORDER), around=100.0, asks=lambda s: s % 2 == 0)
    assert len(answers) == 1 + len(STEP_ORDER) and tuning.settled == {"q": "b"}
    assert tuning.measurements[0].seconds == {"a": 10.0, "b": 8.0}


def test_a_question_no_longer_asked_yields_its_turn():
    """A warm-up's short prompt asks for a cache class that the long prompts after it never reach."""
    tuning = StepTuning(KernelTimer(None), "steps: ")
    tuning.clock = clock = FakeClock()
    for step in range(2 + len(STEP_ORDER)):
        tuning.step_started()
        for question in ("short", "long") if step == 0 else ("long",):
            with tuning.answering(question, "a", "b") as answer:
                clock.now += {"a": 10.0, "b": 8.0}[answer]
        tuning.step_done()
    assert tuning.settled == {"long": "b"} and tuning.testing == "short"


def test_decode_steps_settle_each_product_and_attention_kernel(fresh_timer):
    model = make_model(**CONFIGS["mha_gqa_bias"]).to(torch.bfloat16)
    cache = DeepseekV2Cache(config=model.config)
    with torch.no_grad():
        model(random_ids(1, 6), cache=cache)
        for _ in range(64):
            model(random_ids(1, 1), cache=cache)
    (tuning,) = kernels._tunings.values()
    assert tuning.done
    steps = {k.split(": ")[1]: v for k, v in fresh_timer.choices().items() if k.startswith("decode step of 1 rows")}
    settled = set(steps)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    pairs = model.config.num_experts_per_tok
    products = {"matmul/layers size 1", "matmul/lm_head size 1"}
    attention = {f"one_query_scores/keys<=256 size {group}", f"one_query_values/keys<=256 size {group}"}
    assert settled == products | attention | {f"experts size {pairs}"}
    assert {steps[q] for q in settled if q.startswith("matmul")} <= {"torch_default", "native_gemv"}
    assert {steps[q] for q in attention} <= {"onednn", "native_gemv"}
    assert steps[f"experts size {pairs}"] in ("sorted", "each_expert")


def test_one_query_attention_is_settled_per_class_of_cache_length(fresh_timer):
    lengths = (1, 256, 257, 1024, 4096, 16385)
    assert [key_length_class(n) for n in lengths] == [
        "keys<=256", "keys<=256", "keys<=1024", "keys<=1024", "keys<=4096", "keys>16384"
    ]  # fmt: skip
    model = make_model(**CONFIGS["mha_gqa_bias"]).to(torch.bfloat16)
    with torch.no_grad():
        for prompt in (6, 300):
            cache = DeepseekV2Cache(config=model.config)
            model(random_ids(1, prompt), cache=cache)
            for _ in range(2):
                model(random_ids(1, 1), cache=cache)
    (tuning,) = kernels._tunings.values()
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    asked = {question for question in tuning.seen if question.startswith("one_query")}
    assert asked == {f"one_query_{part}/{length} size {group}"
                     for part in ("scores", "values") for length in ("keys<=256", "keys<=1024")}  # fmt: skip


def test_float32_steps_are_not_timed(fresh_timer):
    model = make_model(**CONFIGS["mha_gqa_bias"])
    cache = DeepseekV2Cache(config=model.config)
    with torch.no_grad():
        model(random_ids(1, 6), cache=cache)
        model(random_ids(1, 1), cache=cache)
    assert kernels._tunings == {} and fresh_timer.choices() == {}
