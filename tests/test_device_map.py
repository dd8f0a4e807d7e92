"""Loading with ``device_map``: offload to CPU and disk gives the same tokens; "auto" maps never split blocks.

There is no GPU here, so spreading over devices is tested with "cpu" (executed in place) and "disk"
(weights read back from the offload folder at every forward); the maps for several GPUs are computed
on the meta device with the published small config.
"""

import warnings

import pytest
import torch
from accelerate import infer_auto_device_map as accelerate_infer_auto_device_map
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from deepseek_vl2.chat import DeepseekVL2Chat
from deepseek_vl2.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl2.planner import auto_device_map, meta_model
from deepseek_vl2.testing.published import published_config

IMAGE_INPUTS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")
VISION_SIDE = ("image_newline", "view_seperator", "vision", "projector", "language.model.embed_tokens")


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def encode(processor, prompt: str, images: list[Image.Image]):
    conversation = [
        {"role": "<|User|>", "content": "<image>\n" * len(images) + prompt},
        {"role": "<|Assistant|>", "content": ""},
    ]
    return processor(conversations=conversation, images=images, force_batchify=True)


def greedy(processor, max_new_tokens: int = 8) -> dict:
    tokenizer = processor.tokenizer
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


class Collect(BaseStreamer):
    """A streamer that keeps every token it is given (the prompt first)."""

    def __init__(self):
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.tokens += value.flatten().tolist()

    def end(self) -> None:
        pass


def spread_map(num_layers: int) -> dict[str, str]:
    """Vision side and the first layer in CPU RAM, the other layers, norm and head offloaded to disk."""
    device_map = dict.fromkeys(VISION_SIDE, "cpu")
    device_map["language.model.layers.0"] = "cpu"
    for layer in range(1, num_layers):
        device_map[f"language.model.layers.{layer}"] = "disk"
    device_map.update({"language.model.norm": "disk", "language.lm_head": "disk"})
    return device_map


def load_spread(path, device_map, offload_folder) -> DeepseekVLV2ForCausalLM:
    with warnings.catch_warnings():  # accelerate's check lists the two top-level parameters as unknown modules
        warnings.filterwarnings("ignore", message="The following device_map keys do not match")
        model = DeepseekVLV2ForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map=device_map, offload_folder=str(offload_folder)
        )
    return model.eval()


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_offloaded_model_generates_the_same_tokens(variant, checkpoint_dir, loaded, tmp_path):
    plain, processor = loaded(variant)
    path = checkpoint_dir(variant)
    layers = plain.config.language_config.num_hidden_layers
    model = load_spread(path, spread_map(layers), tmp_path / "offload")
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert model.language.model.layers[layers - 1].mlp.experts.gate_up_proj.device.type == "meta", "really offloaded"

    inputs = encode(processor, "Describe the picture.", [picture(500, 300, seed=1)])
    kwargs = greedy(processor)
    expected = plain.generate(**{k: inputs[k] for k in IMAGE_INPUTS}, **kwargs)

    streamer = Collect()
    tokens = model.generate(**{k: inputs[k] for k in IMAGE_INPUTS}, streamer=streamer, **kwargs)
    assert tokens.tolist() == expected.tolist()
    assert streamer.tokens == expected[0].tolist(), "streaming sees the prompt, then each new token"

    embeds, cache = model.incremental_prefilling(**inputs, chunk_size=32)
    assert {layer.keys.device.type for layer in cache.layers} == {"cpu"}, "the cache lives where layers execute"
    prefilled = model.generate(
        inputs_embeds=embeds, input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, cache=cache, **kwargs
    )
    assert prefilled.tolist() == expected.tolist()


def test_device_map_auto_offloads_to_disk_when_ram_is_short(checkpoint_dir, loaded, ram_for_two_layers, tmp_path):
    plain, processor = loaded("small")
    path = checkpoint_dir("small")
    ram = ram_for_two_layers("small")  # the rest of the decoder goes to disk
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following device_map keys do not match")
        model = DeepseekVLV2ForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            device_map="auto",
            max_memory={"cpu": ram},
            offload_folder=str(tmp_path / "offload"),
        ).eval()
    device_map = model.hf_device_map
    assert device_map["language.model.layers.0"] == "cpu" and device_map["language.lm_head"] == "disk"
    assert all(device_map[name] == "cpu" for name in VISION_SIDE)
    assert not any(".mlp" in key or ".self_attn" in key or key.startswith("vision.") for key in device_map)

    inputs = encode(processor, "What is here?", [picture(300, 400, seed=2)])
    kwargs = greedy(processor)
    expected = plain.generate(**{k: inputs[k] for k in IMAGE_INPUTS}, **kwargs)
    assert model.generate(**{k: inputs[k] for k in IMAGE_INPUTS}, **kwargs).tolist() == expected.tolist()


def test_chat_api_loads_with_device_map_and_disk_offload(checkpoint_dir, ram_for_two_layers, tmp_path):
    path, offload = checkpoint_dir("tiny"), tmp_path / "offload"
    plain = DeepseekVL2Chat.from_pretrained(path, dtype="fp32", device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following device_map keys do not match")
        budget = {"cpu": ram_for_two_layers("tiny")}
        spread = DeepseekVL2Chat.from_pretrained(
            path, dtype="fp32", device_map="auto", max_memory=budget, offload_folder=offload
        )
    assert "disk" in spread.model.hf_device_map.values() and any(offload.iterdir()), "really offloaded to disk"
    assert spread.device.type == "cpu"
    kwargs = dict(images=[picture(400, 300, seed=3)], greedy=True, max_new_tokens=8)
    expected = plain.chat("What is here?", **kwargs)
    pieces = list(spread.stream("What is here?", **kwargs))
    *text, result = pieces
    assert result.answer == expected.answer and "".join(text) == expected.answer
    chunked = DeepseekVL2Chat(spread.model, spread.processor, chunk_size=16)
    assert chunked.chat("What is here?", **kwargs).answer == expected.answer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cpu", device_map="auto"), "not both"),
        (dict(max_memory={"cpu": "1GiB"}), "without a device_map, max_memory would be ignored"),
        (dict(offload_folder="offload"), "without a device_map, offload_folder would be ignored"),
        (dict(chunk_size=0), "chunk_size must be a positive whole number of tokens"),
    ],
)
def test_chat_api_refuses_loading_options_that_do_not_fit_together(checkpoint_dir, monkeypatch, kwargs, message):
    monkeypatch.setattr(DeepseekVLV2Processor, "from_pretrained", lambda *a, **k: pytest.fail("checked after loading"))
    with pytest.raises(ValueError, match=message):
        DeepseekVL2Chat.from_pretrained(checkpoint_dir("tiny"), **kwargs)


# ---------------------------------------------------------------------------------------------- maps for GPUs


@pytest.fixture(scope="module")
def published_small() -> torch.nn.Module:
    config = DeepseekVLV2Config(**published_config("small"))
    return meta_model(config, torch.bfloat16)


def assert_blocks_whole_and_vision_side_together(model: torch.nn.Module, device_map: dict) -> None:
    for key in device_map:
        parts = key.split(".")
        inside_layer = key.startswith("language.model.layers.") and len(parts) > 4
        assert not inside_layer, f"decoder layer split: {key}"
        assert not key.startswith("vision."), f"vision tower split: {key}"
    placed = {name: device_map[name] for name in VISION_SIDE}
    assert len(set(placed.values())) == 1, f"vision side spread over devices: {placed}"
    # every parameter is placed, nothing twice
    names = [name for name, _ in model.named_parameters()]
    for name in names:
        owners = [key for key in device_map if name == key or name.startswith(key + ".")]
        assert len(owners) == 1, f"{name} placed by {owners}"


@pytest.mark.parametrize(
    "max_memory",
    [
        {0: "20GiB", 1: "20GiB", "cpu": "64GiB"},
        {0: "12GiB", 1: "12GiB", 2: "12GiB", "cpu": "64GiB"},
        {0: "8GiB", 1: "8GiB", 2: "8GiB", "cpu": "64GiB"},  # too small: the tail goes to CPU RAM
        {0: "10GiB", 1: "10GiB"},  # no CPU budget: the tail goes to disk
    ],
)
def test_auto_device_map_keeps_blocks_whole(published_small, max_memory):
    gpus = [key for key in max_memory if isinstance(key, int)]
    for device_map in (
        auto_device_map(published_small, max_memory),  # what from_pretrained(device_map="auto") computes
        accelerate_infer_auto_device_map(
            published_small, max_memory=max_memory, no_split_module_classes=published_small._no_split_modules
        ),
    ):
        assert_blocks_whole_and_vision_side_together(published_small, device_map)
        assert device_map["vision"] == 0
        used = set(device_map.values())
        assert set(gpus) <= used, f"some GPU left empty: {used}"
        layers = [device_map[f"language.model.layers.{i}"] for i in range(27)]
        order = [*gpus, "cpu", "disk"]
        assert layers == sorted(layers, key=order.index), "layers fill the devices in order"


def test_no_split_modules_name_real_classes(published_small):
    classes = {type(module).__name__ for module in published_small.modules()}
    assert set(published_small._no_split_modules) <= classes
    assert {"VisionTransformer", "DeepseekV2DecoderLayer"} <= set(published_small._no_split_modules)
