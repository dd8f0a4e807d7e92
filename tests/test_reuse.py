"""Reuse across turns: kept prompt caches and image features give the answers of a fresh computation."""

from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from deepseek_vl2.chat import DeepseekVL2Chat
from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.models.cache import DeepseekV2Cache
from deepseek_vl2.models.reuse import ImageSpan, PrefixCache, PromptKey, ReuseCache
from deepseek_vl2.planner import default_reuse_budget

STREET, CHART, SHAPES = "images/street.png", "images/chart.png", "images/shapes.png"
GREEDY = {"greedy": True, "max_new_tokens": 6}


@pytest.fixture(autouse=True)
def repository_cwd(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


@pytest.fixture
def chats(loaded):
    """``chats(variant, **options)`` -> (a chat that reuses, a chat that does not) over the same fp32 model."""

    def get(variant="tiny", **options):
        model, processor = loaded(variant)
        return DeepseekVL2Chat(model, processor, **options), DeepseekVL2Chat(model, processor, reuse=False, **options)

    return get


@pytest.fixture
def recorded_logits(monkeypatch):
    """``recorded_logits(model)`` -> a list that gets the logits of every later ``generate`` call."""

    def install(model):
        logits = []
        generate = model.generate

        def generate_recording(*args, **kwargs):
            out = generate(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
            logits.append(torch.stack(out.logits))
            return out.sequences

        monkeypatch.setattr(model, "generate", generate_recording)
        return logits

    return install


@contextmanager
def vision_calls(model):
    """A list that gets the tile count of each vision-tower call made inside the block."""
    tiles = []
    hook = model.vision.register_forward_hook(lambda module, args, output: tiles.append(args[0].shape[0]))
    try:
        yield tiles
    finally:
        hook.remove()


def turn(chat, prompt, previous=None, **kwargs):
    return chat.chat(prompt, history=None if previous is None else previous.history, **GREEDY, **kwargs)


def prompt_ids(chat, result) -> list[int]:
    """The token ids of the prompt a turn answered (image tokens expanded, as the model reads them)."""
    conversation = [*result.history[:-1], {"role": "<|Assistant|>", "content": ""}]
    return chat.processor(conversations=conversation, images=result.images, force_batchify=True).input_ids[0].tolist()


def first_difference(chat, one, other) -> int:
    a, b = prompt_ids(chat, one), prompt_ids(chat, other)
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("variant, images", [("tiny", [STREET]), ("tiny", [STREET, CHART]), ("small", [STREET]),
                                             ("small", [STREET, CHART])])  # fmt: skip
def test_follow_ups_give_the_tokens_and_logits_of_a_fresh_computation(chats, recorded_logits, variant, images):
    reusing, fresh = chats(variant)
    logits, results = recorded_logits(reusing.model), {}
    with vision_calls(reusing.model) as tiles:
        for chat in (reusing, fresh):
            first = turn(chat, "Describe the images.", images=images)
            second = turn(chat, "What else?", first)
            third = turn(chat, "And the colours?", second)
            results[chat] = (first, second, third)
    for with_reuse, without in zip(results[reusing], results[fresh]):
        assert with_reuse.answer == without.answer and with_reuse.prompt == without.prompt
    for step in range(3):
        assert logits[step].shape == logits[step + 3].shape
        assert (logits[step] - logits[step + 3]).abs().max() <= 1e-5
    first, second, third = results[reusing]
    assert (first.reused_tokens, second.reused_tokens) == (0, first.prompt_tokens)
    assert third.reused_tokens == second.prompt_tokens
    assert len(tiles) == 1 + 3  # the reusing chat encodes the images once, the other at each turn


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_a_new_image_in_turn_two_is_the_only_one_encoded(chats, variant):
    reusing, fresh = chats(variant)
    first = turn(reusing, "Describe this.", images=[STREET])
    with vision_calls(reusing.model) as tiles:
        second = turn(reusing, "And this one?", first, images=[CHART])
        turn(fresh, "Alone.", images=[CHART])
    with_reuse, chart_alone = tiles
    assert with_reuse == chart_alone
    assert second.reused_tokens == first.prompt_tokens
    fresh_first = turn(fresh, "Describe this.", images=[STREET])
    assert second.answer == turn(fresh, "And this one?", fresh_first, images=[CHART]).answer


def test_a_changed_system_prompt_or_earlier_turn_reuses_only_what_is_unchanged(chats):
    reusing, fresh = chats()
    first = turn(reusing, "Describe this.", images=[STREET], system="Be brief.")
    other_system = turn(reusing, "More?", first, system="Be verbose and careful.")
    assert other_system.reused_tokens <= first_difference(reusing, first, other_system)
    assert other_system.answer == turn(fresh, "More?", first, system="Be verbose and careful.").answer

    edited = [dict(message) for message in first.history]
    edited[1]["content"] = edited[1]["content"].replace("Describe this.", "Name the colours.")
    reply = reusing.chat("More?", history=edited, **GREEDY)
    assert 0 < reply.reused_tokens <= first_difference(reusing, first, reply)
    assert reply.answer == fresh.chat("More?", history=edited, **GREEDY).answer


def test_another_image_at_the_same_place_is_not_taken_for_the_first(chats):
    reusing, fresh = chats()
    street = Image.open(STREET).convert("RGB")
    changed = street.copy()
    changed.paste((255, 0, 255), (0, 0, street.width // 2, street.height // 2))
    first = turn(reusing, "Describe this.", images=[street])
    with vision_calls(reusing.model) as tiles:
        again = turn(reusing, "Describe this.", images=[changed])
    assert tiles and again.prompt_tokens == first.prompt_tokens  # same tokens, other pixels
    image_start = prompt_ids(reusing, first).index(reusing.processor.image_token_id)
    assert again.reused_tokens <= image_start
    assert again.answer == turn(fresh, "Describe this.", images=[changed]).answer


def test_another_model_dtype_or_chunk_size_gets_no_stale_cache(checkpoint_dir):
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=torch.float32).eval()
    twin = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir("tiny"), dtype=torch.float32).eval()
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    chat = DeepseekVL2Chat(model, processor)
    first = turn(chat, "Describe this.", images=[STREET])

    chunked = DeepseekVL2Chat(model, processor, chunk_size=64)
    chunked.reuse = chat.reuse  # one kept state, seen through another chunk size
    with vision_calls(model) as tiles:
        follow_up = turn(chunked, "More?", first)
    assert follow_up.reused_tokens == 0 and tiles == []  # image features do not depend on the chunk size

    other = DeepseekVL2Chat(twin, processor)
    other.reuse = chat.reuse
    assert turn(other, "More?", first).reused_tokens == 0

    model.to(torch.bfloat16)
    with vision_calls(model) as tiles:
        in_bfloat16 = turn(chat, "More?", first)
    assert in_bfloat16.reused_tokens == 0 and tiles


def test_regenerate_and_a_stopped_answer_leave_a_usable_state(chats):
    reusing, fresh = chats()
    stream = reusing.stream("Tell a long story.", images=[STREET], greedy=True, max_new_tokens=200)
    next(stream)
    stream.close()  # Stop in the middle of the answer
    again = turn(reusing, "Tell a long story.", images=[STREET])
    assert again.reused_tokens == again.prompt_tokens - 1  # all but the last token, which starts the answer
    assert again.answer == turn(fresh, "Tell a long story.", images=[STREET]).answer


def test_clear_reuse_starts_afresh(chats):
    reusing, _ = chats()
    first = turn(reusing, "Describe this.", images=[STREET])
    assert len(reusing.reuse) == 2  # the image's features and the prompt's cache
    reusing.clear_reuse()
    assert len(reusing.reuse) == 0 and reusing.reuse.nbytes == 0
    with vision_calls(reusing.model) as tiles:
        second = turn(reusing, "More?", first)
    assert second.reused_tokens == 0 and tiles


def test_eviction_under_a_small_budget_keeps_answers_right(chats):
    reusing, fresh = chats()
    turn(reusing, "Describe this.", images=[STREET])
    image_bytes = sum(e.nbytes for e in reusing.reuse._entries.values() if not isinstance(e, PrefixCache))
    reusing.clear_reuse()
    reusing.reuse.budget = image_bytes  # the image's features fit, a prompt's cache does not
    first = turn(reusing, "Describe this.", images=[STREET])
    second = turn(reusing, "More?", first)
    assert second.reused_tokens == 0 and reusing.reuse.nbytes == image_bytes
    assert second.answer == turn(fresh, "More?", turn(fresh, "Describe this.", images=[STREET])).answer


def test_reuse_off_and_bad_budgets(loaded, checkpoint_dir):
    model, processor = loaded("tiny")
    assert DeepseekVL2Chat(model, processor, reuse=False).reuse is None
    assert DeepseekVL2Chat(model, processor, reuse_budget=0).reuse is None
    default = DeepseekVL2Chat(model, processor).reuse.budget
    assert default == default_reuse_budget(model.config.language_config, model.dtype) > 0
    off = DeepseekVL2Chat(model, processor, reuse=False)
    first = off.chat("Hi.", **GREEDY)
    assert off.chat("More?", history=first.history, **GREEDY).reused_tokens == 0
    for bad in (-1, "1GB", 1.5, True):
        with pytest.raises(ValueError, match="reuse_budget must be a whole number of bytes"):
            DeepseekVL2Chat(model, processor, reuse_budget=bad)
    with pytest.raises(TypeError, match="reuse must be True or False"):
        DeepseekVL2Chat(model, processor, reuse="yes")
    with pytest.raises(ValueError, match="reuse_budget"):  # before any loading
        DeepseekVL2Chat.from_pretrained(checkpoint_dir("tiny"), reuse_budget=-5)


def key(tokens, images=(), context="model"):
    return PromptKey(tuple(tokens), tuple(ImageSpan(*span) for span in images), context)


def test_a_common_prefix_never_ends_inside_an_image_run():
    old = key([1, 2, 9, 9, 9, 3, 4], [(2, 5, "street")])
    assert key([1, 2, 9, 9, 9, 3, 4, 5, 6], [(2, 5, "street")]).common_prefix(old) == 7
    assert key([1, 2, 9, 9, 9, 3, 7], [(2, 5, "street")]).common_prefix(old) == 6
    assert key([1, 2, 9, 9, 9, 3, 4], [(2, 5, "chart")]).common_prefix(old) == 2  # another image, same tokens
    assert key([1, 2, 9, 9], [(2, 4, "street")]).common_prefix(old) == 2  # the run is cut short
    assert key([1, 2, 9, 9, 9, 3, 4], [(2, 5, "street")], context="other").common_prefix(old) == 0
    assert key([5, 2]).common_prefix(old) == 0


def filled_cache(layers: int, positions: int, width: int = 4) -> DeepseekV2Cache:
    cache = DeepseekV2Cache()
    for layer in range(layers):
        states = torch.arange(positions * width, dtype=torch.float32).view(1, 1, positions, width) + layer
        cache.update(states, -states, layer)
    return cache


def test_lru_eviction_by_bytes():
    run = torch.zeros(250)  # 1000 bytes
    reuse = ReuseCache(budget=3000)
    for name in ("a", "b", "c"):
        reuse.keep_image_run(name, run.clone())
    reuse.image_runs(["a"])  # used again: now the most recent
    reuse.keep_image_run("d", run.clone())
    assert set(reuse.image_runs(["a", "b", "c", "d"])) == {"a", "c", "d"} and reuse.nbytes == 3000
    reuse.keep_image_run("huge", torch.zeros(1000))
    assert reuse.image_runs(["huge"]) == {} and len(reuse) == 3  # larger than the budget: never kept


def test_eight_sessions_stay_within_the_budget_and_free_their_own():
    cache_bytes = filled_cache(3, 10).nbytes
    reuse = ReuseCache(budget=3 * cache_bytes)
    for session in range(8):
        reuse.keep_prefix(key(range(session * 100, session * 100 + 10)), filled_cache(3, 10), owner=session)
        assert reuse.nbytes <= reuse.budget
    assert len(reuse) == 3
    reuse.drop(7)
    assert len(reuse) == 2 and {entry.owner for entry in reuse._entries.values()} == {5, 6}


def test_taking_and_copying_a_kept_prefix():
    reuse = ReuseCache(budget=1 << 20)
    old = key([1, 2, 3, 4, 5, 6])
    reuse.keep_prefix(old, filled_cache(2, 8))  # prompt and two answer positions: cut to the prompt
    copied, shared = reuse.take_prefix(key([1, 2, 3, 4, 7, 8]), limit=5)
    assert shared == 4 and copied.get_seq_length() == 4 and len(reuse) == 1  # partly shared: copied
    kept = next(iter(reuse._entries.values())).cache
    assert torch.equal(copied.layers[1].keys, kept.layers[1].keys[..., :4, :])
    copied.layers[1].keys.zero_()
    assert kept.layers[1].keys[..., 1:4, :].abs().sum() > 0  # a copy, not a view
    taken, shared = reuse.take_prefix(key([1, 2, 3, 4, 5, 6, 7, 8]), limit=7)
    assert shared == 6 and taken is kept and len(reuse) == 0  # extended whole: taken


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_a_copied_prefix_continues_bit_for_bit_as_the_cache_it_was_cut_from(loaded, variant):
    model, processor = loaded(variant)
    conversation = [{"role": "<|User|>", "content": "<image>\nDescribe it in detail.", "images": [STREET]},
                    {"role": "<|Assistant|>", "content": ""}]  # fmt: skip
    inputs = processor(conversations=conversation, images=[Image.open(STREET).convert("RGB")], force_batchify=True)
    embeds, whole = model.incremental_prefilling(**inputs, chunk_size=4096)
    length = whole.get_seq_length()
    split = length - 5
    copy = whole.copy_prefix(split)
    whole.keep_prefix(split)
    outputs = []
    for cache in (whole, copy):
        _, cache = model.incremental_prefilling(inputs_embeds=embeds, chunk_size=2, cache=cache)
        step = model(inputs_embeds=embeds[:, -1:], cache=cache, position_ids=torch.tensor([[length]]))
        outputs.append(step.logits)
    assert torch.equal(*outputs)
    assert whole.nbytes >= copy.nbytes > 0


def test_web_sessions_keep_their_own_history_and_clear_frees_theirs(loaded, monkeypatch):
    pytest.importorskip("gradio")
    from deepseek_vl2.chat import ChatResult
    from deepseek_vl2.web.app import ChatApp, session_owner

    model, processor = loaded("tiny")
    chat, fresh = DeepseekVL2Chat(model, processor), DeepseekVL2Chat(model, processor, reuse=False)
    results = []

    class Recording:
        processor, context_length, device = chat.processor, chat.context_length, chat.device

        def clear_reuse(self, owner=None):
            chat.clear_reuse(owner)

        def stream(self, *args, **kwargs):
            for piece in chat.stream(*args, **kwargs):
                if isinstance(piece, ChatResult):
                    results.append(piece)
                yield piece

    app = ChatApp(Recording(), model_name="t")
    alice, bob = [], []
    for session, text in ((alice, "Describe it."), (bob, "Describe it."), (alice, "Colours?"), (bob, "Shapes?")):
        app.add_message({"text": text, "files": [STREET] if not session else []}, session)
        list(app.respond(session, 0.9, 0.0, 1.1, 6, 4096))
        assert session[-1].error is None, session[-1].error
    alice_first, bob_first, alice_second, bob_second = results
    assert alice_second.reused_tokens == alice_first.prompt_tokens and "Shapes?" not in alice_second.prompt
    # Bob's conversation so far is token for token Alice's (same question, same greedy answer), so he may
    # reuse positions past his own first prompt: what he shares with hers, never her new question.
    assert bob_second.reused_tokens >= bob_first.prompt_tokens and "Colours?" not in bob_second.prompt
    expected = fresh.chat("Shapes?", history=bob_first.history, greedy=True, max_new_tokens=6).answer
    assert bob_second.answer == expected

    owners = {entry.owner for entry in chat.reuse._entries.values() if isinstance(entry, PrefixCache)}
    assert owners == {session_owner(alice), session_owner(bob)}
    app.clear(alice)
    owners = {entry.owner for entry in chat.reuse._entries.values() if isinstance(entry, PrefixCache)}
    assert owners == {session_owner(bob)}

    app.add_message({"text": "A long story, please.", "files": []}, alice)
    updates = app.respond(alice, 0.9, 0.0, 1.1, 200, 4096)
    next(updates), next(updates)  # "Generating…", then the first streamed text
    app.clear(alice)  # Clear while the answer is being generated
    list(updates)
    owners = {entry.owner for entry in chat.reuse._entries.values() if isinstance(entry, PrefixCache)}
    assert owners == {session_owner(bob)}


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_follow_ups_with_an_offloaded_model(checkpoint_dir, loaded, variant, tmp_path):
    from test_device_map import load_spread, spread_map

    plain, processor = loaded(variant)
    layers = plain.config.language_config.num_hidden_layers
    offloaded = load_spread(checkpoint_dir(variant), spread_map(layers), tmp_path / "offload")
    reusing, fresh = DeepseekVL2Chat(offloaded, processor), DeepseekVL2Chat(plain, processor, reuse=False)
    first = turn(reusing, "Describe this.", images=[STREET])
    second = turn(reusing, "More?", first)
    assert second.reused_tokens == first.prompt_tokens
    assert second.answer == turn(fresh, "More?", turn(fresh, "Describe this.", images=[STREET])).answer


def test_web_demo_flags(tmp_path):
    from deepseek_vl2.options import reuse_options
    from deepseek_vl2.web.demo import build_parser

    def options(*flags):
        return reuse_options(build_parser().parse_args(["--demo", *flags]))

    assert options() == {"reuse": True, "reuse_budget": None}
    assert options("--no-reuse") == {"reuse": False, "reuse_budget": None}
    assert options("--reuse_budget", "2GiB") == {"reuse": True, "reuse_budget": 2 << 30}
    assert options("--reuse_budget", "0")["reuse_budget"] == 0
    with pytest.raises(ValueError, match="memory size"):
        options("--reuse_budget", "lots")
