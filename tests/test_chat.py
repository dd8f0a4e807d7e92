"""The notebook chat API on built checkpoints: answers, streaming, history, grounding, failures."""

import pytest
import torch

from deepseek_vl2.chat import ChatResult, DeepseekVL2Chat, GenerationSettings
from deepseek_vl2.grounding import draw_grounding
from deepseek_vl2.testing.checkpoints import build_checkpoint
from deepseek_vl2.testing.scripted import script_checkpoint
from deepseek_vl2.utils.checks import pick_device, pick_dtype

STREET = "images/street.png"
BOX_ANSWER = "<|ref|>the red car<|/ref|><|det|>[[100, 600, 370, 830]]<|/det|>"


@pytest.fixture(scope="module")
def chat(checkpoint_dir):
    return DeepseekVL2Chat.from_pretrained(checkpoint_dir("tiny"), dtype="fp32")


@pytest.fixture(scope="module")
def scripted_chat(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("scripted"), "tiny")
    script_checkpoint(path, BOX_ANSWER, extra_tokens=("[[100, 600, 370, 830]]",))
    return DeepseekVL2Chat.from_pretrained(path)  # defaults: CPU here, bfloat16


@pytest.fixture(autouse=True)
def repository_cwd(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_chat_and_stream_give_the_same_answer(chat):
    pieces = list(chat.stream("Describe the scene.", images=[STREET], greedy=True, max_new_tokens=12))
    *text, result = pieces
    assert isinstance(result, ChatResult) and all(isinstance(p, str) for p in text)
    assert "".join(text).removesuffix(chat.processor.tokenizer.eos_token) == result.answer
    again = chat.chat("Describe the scene.", images=[STREET], greedy=True, max_new_tokens=12)
    assert again.answer == result.answer
    assert result.new_tokens >= 1 and result.prompt_tokens > 400
    assert set(result.timings) == {"prefill_s", "decode_s", "tokens_per_s"}


def test_chunked_prefill_gives_the_same_answer(chat, checkpoint_dir):
    chunked = DeepseekVL2Chat(chat.model, chat.processor, chunk_size=8)
    kwargs = dict(images=[STREET], greedy=True, max_new_tokens=10)
    assert chunked.chat("What is this?", **kwargs).answer == chat.chat("What is this?", **kwargs).answer


def test_history_carries_the_previous_turn(chat):
    first = chat.chat("Hello.", greedy=True, max_new_tokens=5)
    second = chat.chat("And then?", history=first.history, greedy=True, max_new_tokens=5, system="Be brief.")
    assert second.prompt.startswith("Be brief.<|User|>: Hello.")  # a system message, as the original reads it
    assert first.answer in second.prompt and second.prompt.endswith("<|User|>: And then?\n\n<|Assistant|>:")
    assert [m["role"] for m in second.history] == ["system", "<|User|>", "<|Assistant|>", "<|User|>", "<|Assistant|>"]


@pytest.mark.parametrize("role", ["System", "deepseekapi-sys"])
def test_system_replaces_a_history_system_message_of_any_spelling(chat, role):
    history = [{"role": role, "content": "Old rules."}, {"role": "user", "content": "Hi."},
               {"role": "assistant", "content": "Hello."}]  # fmt: skip
    conversation, _ = chat.build_conversation("And then?", history=history, system="New rules.")
    assert [m["content"] for m in conversation if m["role"] == "system"] == ["New rules."]
    assert len(conversation) == 5


def test_grounding_answer_end_to_end(scripted_chat):
    result = scripted_chat.chat("Where is the red car?", images=[STREET])
    assert result.answer == BOX_ANSWER
    assert result.text == "the red car"
    (car,) = result.grounding.objects
    assert car.label == "the red car"
    width, height = result.images[-1].size
    assert car.pixel_boxes(width, height) == [pytest.approx((100 * width / 999, 600 * height / 999, 370 * width / 999, 830 * height / 999))]


def test_grounding_json_and_overlays_are_for_the_last_image(scripted_chat):
    result = scripted_chat.chat("Where is the red car?", images=["images/shapes.png", STREET])
    width, height = result.images[-1].size
    assert result.grounding_json() == {
        "boxes": [{
            "label": "the red car",
            "boxes_0_999": [[100, 600, 370, 830]],
            "boxes_pixels": [[100 * width / 999, 600 * height / 999, 370 * width / 999, 830 * height / 999]],
        }],
        "grounding_problems": [],
    }  # fmt: skip
    (overlay,) = result.grounding_overlays()
    assert overlay.tobytes() == draw_grounding(result.images[-1], result.grounding).tobytes()

    text_only = scripted_chat.chat("Where is the red car?")
    assert text_only.grounding_json()["boxes"] == [{"label": "the red car", "boxes_0_999": [[100, 600, 370, 830]]}]
    assert text_only.grounding_overlays() == []


def test_failure_in_generation_reaches_the_caller_and_chat_stays_usable(chat, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(chat.model, "generate", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        list(chat.stream("Hi.", max_new_tokens=3))
    monkeypatch.undo()
    assert chat.chat("Hi.", greedy=True, max_new_tokens=3).new_tokens >= 1


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=0), "repetition_penalty"),
    ],
)
def test_generation_settings_out_of_range(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**settings)


def test_device_and_dtype_choices():
    assert pick_device(None).type in ("cpu", "cuda")
    assert pick_dtype(None) == torch.bfloat16 and pick_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        pick_dtype("float8")
    with pytest.raises(ValueError, match="device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")


def test_bad_chunk_size(chat):
    with pytest.raises(ValueError, match="chunk_size"):
        DeepseekVL2Chat(chat.model, chat.processor, chunk_size=0)


def test_prompt_longer_than_context_is_a_clear_error(chat):
    from deepseek_vl2.chat import ContextTooLongError

    with pytest.raises(ContextTooLongError, match=r"prompt has \d+ tokens .* max_new_tokens is 4000: \d+ > the model's context of 4096"):
        chat.chat("Describe.", images=[STREET], max_new_tokens=4000)


def test_closing_the_stream_stops_generation(chat):
    stream = chat.stream("Write a long story.", max_new_tokens=3000, temperature=1.0)
    first = next(stream)
    assert isinstance(first, str)
    stream.close()  # what a `break`, or a web client going away, does
    assert not chat._lock.locked(), "the generating thread has finished"
    assert chat.chat("Hi.", greedy=True, max_new_tokens=2).new_tokens >= 1


def test_ctrl_c_leaves_the_model_usable(chat, sigint_raises):
    import _thread
    import time

    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        for _ in chat.stream("Write a long story.", max_new_tokens=3000, temperature=1.0):
            _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread
            time.sleep(5)
    assert time.perf_counter() - started < 5
    assert not chat._lock.locked(), "the generating thread was stopped and joined"
    result = chat.chat("Hi.", greedy=True, max_new_tokens=3)
    assert result.new_tokens >= 1


def test_streamed_pieces_are_exactly_the_answer(scripted_chat):
    *pieces, result = scripted_chat.stream("Where is the red car?", images=[STREET])
    assert result.answer == BOX_ANSWER
    assert "".join(pieces) == BOX_ANSWER, "no end-of-sentence token in the streamed text"


def test_streamer_holds_back_a_split_character_and_sends_the_rest_at_the_end(chat):
    from deepseek_vl2.chat import _QueueStreamer

    tokenizer = chat.processor.tokenizer
    first, second = tokenizer.encode("日", add_special_tokens=False)[:2]  # the first two of its three bytes
    streamer = _QueueStreamer(tokenizer, skip_prompt_tokens=True)
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt, skipped
    streamer.put(torch.tensor([first]))
    streamer.put(torch.tensor([second]))
    assert streamer.queue.empty(), "an incomplete character is held back while more may come"
    streamer.put(torch.tensor([tokenizer.eos_token_id]))
    streamer.end()
    assert list(streamer) == [tokenizer.decode([first, second])], "what never completed is still sent"


def test_images_none_means_no_images(chat):
    conversation, images = chat.build_conversation("Hi.", images=None)
    assert images == [] and conversation[-2] == {"role": "<|User|>", "content": "Hi.", "images": []}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(images=3), TypeError, "images must be a list"),
        (dict(history="Hello."), TypeError, "history must be a list of message dicts, got str"),
        (dict(history={"role": "<|User|>", "content": "Hi."}), TypeError, "got dict"),
        (dict(history=["Hello."]), TypeError, "history message 0 must be a dict"),
        (dict(history=[{"role": "<|User|>", "content": "<image>", "images": STREET}]), TypeError, "got a single str"),
        (dict(settings={"max_new_tokens": 3}), TypeError, "settings must be a GenerationSettings"),
        (dict(temperature="0.5"), TypeError, "temperature must be a number"),
        (dict(top_p=None), TypeError, "top_p must be a number"),
        (dict(greedy="no"), TypeError, "greedy must be True or False"),
        (dict(seed="1"), TypeError, "seed must be an int"),
        (dict(seed=2**70), ValueError, "seed must be in"),
    ],
)
def test_bad_arguments_name_the_problem(chat, kwargs, error, message):
    with pytest.raises(error, match=message):
        chat.chat("Hi.", max_new_tokens=2, **kwargs)


def test_a_chat_result_as_history_says_what_to_pass(chat):
    first = chat.chat("Hi.", greedy=True, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"pass result\.history"):
        chat.chat("And?", history=first, max_new_tokens=2)
