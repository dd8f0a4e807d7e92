"""A small notebook-level API over the processor and the model: load, ask, read the answer.

It is built only on the public low-level API (processor -> prepare_inputs_embeds, or encode_images
and place_image_runs with ``models.reuse``'s kept state / incremental_prefilling -> generate), so what
it does, a user can do by hand.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import queue
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import CONFIG_NAME

from .grounding import GROUNDED_IMAGE, GroundingResult, clean_answer, overlays, parse_grounding
from .models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from .models.conversation import ASSISTANT, SYSTEM, USER, is_system_role, place_images
from .models.kernels import quantized_kernel
from .models.reuse import PromptKey, ReuseCache, model_context, prompt_image_runs
from .planner import default_reuse_budget
from .quantization import DeepseekVL2QuantizationConfig
from .utils.checkpoint import check_checkpoint_location
from .utils.checks import check_chunk_size, check_max_new_tokens, check_reuse, pick_dtype, pick_placement
from .utils.io import checked_messages, load_image


@dataclass
class GenerationSettings:
    """Sampling settings; the defaults are the ones the original example uses with these models."""

    max_new_tokens: int = 512
    temperature: float = 0.4
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    greedy: bool = False
    seed: int | None = None
    stop: Sequence[str] = ()  # generation ends once the answer contains one of these strings

    def __post_init__(self):
        check_max_new_tokens(self.max_new_tokens)
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be True or False, got {self.greedy!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, Iterable):
            raise TypeError(f"stop must be a list of strings, got {self.stop!r}")
        self.stop = tuple(self.stop)
        if not all(isinstance(text, str) and text for text in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise TypeError(f"seed must be an int or None, got {self.seed!r}")
            if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed accepts
                raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)
        if self.greedy or self.temperature == 0:
            return {**kwargs, "do_sample": False}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class ChatResult:
    answer: str  # decoded answer, special grounding tokens included
    text: str  # the answer for display: grounding tokens removed, labels kept
    grounding: GroundingResult
    prompt: str  # the formatted prompt (sft_format) the model saw
    history: list[dict]  # the conversation including this answer, to pass back as `history`
    images: list[Image.Image]  # every image of the conversation, in order
    prompt_tokens: int
    new_tokens: int
    timings: dict = field(default_factory=dict)  # seconds: prefill (to first token), decode; tokens_per_s
    # "stop": the model ended the answer (end of sentence, or a `stop` string); "length": max_new_tokens ran out
    finish_reason: str = "stop"
    reused_tokens: int = 0  # prompt tokens whose KV cache an earlier turn left (reuse), not prefilled again

    def grounding_json(self) -> dict:
        """``boxes`` (0-999 grid, and pixels of the image they are on) and ``grounding_problems``, for JSON."""
        return self.grounding.to_json(self.images[GROUNDED_IMAGE].size if self.images else None)

    def grounding_overlays(self) -> list[Image.Image]:
        """Annotated copies of the conversation's images that the answer's boxes are on (maybe an earlier turn's)."""
        return overlays(self.images, self.grounding)


class _QueueStreamer(BaseStreamer):
    """Hands decoded text from the generating thread to the caller; never leaves the caller blocked."""

    _DONE = object()

    def __init__(self, tokenizer, skip_prompt_tokens: bool):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.queue: queue.Queue = queue.Queue()
        self.skip_prompt = skip_prompt_tokens
        self.tokens: list[int] = []
        self.printed = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # generate() first puts the prompt ids when it was given input_ids
            self.skip_prompt = False
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        # the final EOS is not part of the answer (ChatResult.answer leaves it out too)
        self.tokens.extend(token for token in value.reshape(-1).tolist() if token != self.eos_token_id)
        # hold back an incomplete multi-byte character until the next token completes it
        self._send(complete_only=True)

    def _send(self, complete_only: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if not (complete_only and text.endswith("\ufffd")) and len(text) > self.printed:
            self.queue.put(text[self.printed :])
            self.printed = len(text)

    def end(self) -> None:
        self._send(complete_only=False)  # what was held back stays undecodable: send it as it is
        self.queue.put(self._DONE)

    def fail(self, error: BaseException) -> None:
        self.queue.put(error)

    def __iter__(self) -> Iterator[str]:
        while (item := self.queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the event is set (Stop button, Ctrl-C, closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ContextTooLongError(ValueError):
    """The prompt plus the tokens to generate do not fit the model's context."""


class DeepseekVL2Chat:
    """Holds a model and its processor; ``chat`` answers, ``stream`` yields the answer as it comes."""

    def __init__(
        self,
        model: DeepseekVLV2ForCausalLM,
        processor: DeepseekVLV2Processor,
        chunk_size: int | None = None,
        reuse: bool = True,
        reuse_budget: int | None = None,
    ):
        """``chunk_size``: prefill in chunks of that many tokens; None prefills in one pass.

        ``reuse``: keep each turn's prompt KV cache and image features, so that a follow-up turn
        (``history=result.history``) prefills only what is new; ``reuse_budget`` bounds the bytes kept
        (default: ``planner.default_reuse_budget``; 0 turns reuse off). ``clear_reuse()`` frees them.
        """
        self.model = model.eval()
        self.processor = processor
        self.chunk_size = None if chunk_size is None else check_chunk_size(chunk_size)
        budget = check_reuse(reuse, reuse_budget)
        if reuse and budget is None:
            budget = default_reuse_budget(model.config.language_config, model.dtype)
        self.reuse = ReuseCache(budget) if reuse and budget else None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        chunk_size: int | None = None,
        device_map: str | dict | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | os.PathLike | None = None,
        reuse: bool = True,
        reuse_budget: int | None = None,
        quantization: str | DeepseekVL2QuantizationConfig | None = None,
    ) -> DeepseekVL2Chat:
        """Load a checkpoint (hub id or folder) onto ``device``, or where ``device_map`` puts it.

        ``device_map`` ("auto", with ``max_memory`` such as ``{0: "20GiB", "cpu": "48GiB"}`` and an
        ``offload_folder``) is transformers' own, as ``deepseek-vl2 plan`` advises; the model then
        stays where it is placed and inputs go to ``model.device``. ``reuse`` and ``reuse_budget`` are
        the constructor's. ``quantization`` ("int8", "int4" or a ``DeepseekVL2QuantizationConfig``)
        quantizes the decoder's weights while loading.
        """
        dtype = pick_dtype(dtype)
        device = pick_placement(device, device_map, max_memory, offload_folder)
        if isinstance(quantization, str):
            quantization = DeepseekVL2QuantizationConfig.from_short_form(quantization)
        if quantization is not None:
            quantized_kernel(torch.device(device or "cpu"), quantization.bits)  # a device without a kernel: now
        if chunk_size is not None:  # checked again by __init__, but before the minutes of loading
            check_chunk_size(chunk_size)
        check_reuse(reuse, reuse_budget)
        check_checkpoint_location(model_path, CONFIG_NAME)
        config = DeepseekVLV2Config.from_pretrained(model_path)  # another model of the same type fails here
        processor = DeepseekVLV2Processor.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            config=config,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            quantization_config=quantization,
        )
        return cls(model if device is None else model.to(device), processor, chunk_size, reuse, reuse_budget)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def clear_reuse(self, owner: Hashable | None = None) -> None:
        """Free what reuse keeps: all of it, or only the prompt caches of one ``owner``'s conversation.

        Never needed for correct answers (a kept cache is used only for a prompt that starts exactly the
        same way); it frees the memory when a conversation is over.
        """
        if self.reuse is None:
            return
        if owner is None:
            self.reuse.clear()
        else:
            self.reuse.drop(owner)

    def build_conversation(
        self,
        prompt: str,
        images: Sequence[str | os.PathLike | Image.Image] = (),
        history: Sequence[dict] | None = None,
        system: str | None = None,
    ) -> tuple[list[dict], list[Image.Image]]:
        """The conversation for one more user turn, and every image in it as RGB PIL images."""
        if images is None:
            images = []
        elif isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        elif not isinstance(images, Iterable):
            raise TypeError(f"images must be a list of file paths or PIL images, got {type(images).__name__}")
        loaded = [load_image(image) for image in images]
        conversation = _copy_history(history)
        if system:
            conversation = [m for m in conversation if not is_system_role(m.get("role"))]
            conversation.insert(0, {"role": SYSTEM, "content": system})
        conversation.append({"role": USER, "content": place_images(prompt, len(loaded)), "images": loaded})
        conversation.append({"role": ASSISTANT, "content": ""})
        all_images = [image for message in conversation for image in message.get("images") or []]
        return conversation, [load_image(image) for image in all_images]

    def stream(
        self,
        prompt: str,
        images: Sequence[str | os.PathLike | Image.Image] = (),
        history: Sequence[dict] | None = None,
        system: str | None = None,
        settings: GenerationSettings | None = None,
        reuse_owner: Hashable | None = None,
        **setting_overrides,
    ) -> Iterator[str | ChatResult]:
        """Yields text pieces as they are generated (together, ``result.answer``), then the ChatResult.

        Closing the generator early (``break``, Ctrl-C, a web client going away) stops generation at
        the next token and leaves the model ready for the next call. ``reuse_owner`` tags the prompt
        cache this turn keeps, for ``clear_reuse(reuse_owner)`` (the web demo passes its browser session).
        """
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
        settings = dataclasses.replace(settings or GenerationSettings(), **setting_overrides)
        conversation, all_images = self.build_conversation(prompt, images, history, system)
        inputs = self.processor(conversations=conversation, images=all_images, force_batchify=True)
        self.check_context(inputs.input_ids.shape[1], settings.max_new_tokens)
        inputs = inputs.to(self.device)
        streamer = _QueueStreamer(self.processor.tokenizer, skip_prompt_tokens=True)
        stop = threading.Event()
        outcome: dict = {}

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    outcome["sequences"] = self._generate(inputs, settings, streamer, stop, reuse_owner, outcome)
            except BaseException as error:  # handed to the consumer, who re-raises it
                streamer.fail(error)
            else:
                streamer.end()

        started = time.perf_counter()
        worker = threading.Thread(target=run, name="deepseek-vl2-generate", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.set()
            worker.join()
        finished = time.perf_counter()
        new_ids = outcome["sequences"][0, inputs.input_ids.shape[1] :]
        answer = self.processor.tokenizer.decode(new_ids, skip_special_tokens=False)
        answer = answer.removesuffix(self.processor.tokenizer.eos_token or "")
        first = streamer.first_token_at or finished
        decode_s = finished - first
        new_tokens = int((new_ids != self.processor.tokenizer.pad_token_id).sum())
        ended = int(new_ids[-1]) == self.processor.tokenizer.eos_token_id
        ended = ended or any(text in answer for text in settings.stop)
        conversation[-1] = {"role": ASSISTANT, "content": answer}
        yield ChatResult(
            answer=answer,
            text=clean_answer(answer),
            grounding=parse_grounding(answer),
            prompt=inputs.sft_format[0],
            history=conversation,
            images=all_images,
            prompt_tokens=int(inputs.input_ids.shape[1]),
            new_tokens=new_tokens,
            timings={
                "prefill_s": first - started,
                "decode_s": decode_s,
                "tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else 0.0,
            },
            finish_reason="stop" if ended or new_tokens < settings.max_new_tokens else "length",
            reused_tokens=outcome.get("reused_tokens", 0),
        )

    def chat(self, *args, **kwargs) -> ChatResult:
        """The whole answer at once; same arguments as ``stream``."""
        *_, result = self.stream(*args, **kwargs)
        return result

    @property
    def context_length(self) -> int:
        return self.model.config.language_config.max_position_embeddings

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextTooLongError, with the numbers, when the prompt and answer cannot fit."""
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ContextTooLongError(
                f"the prompt has {prompt_tokens} tokens (image tokens included) and max_new_tokens is "
                f"{max_new_tokens}: {prompt_tokens + max_new_tokens} > the model's context of {self.context_length} "
                "tokens; use fewer or smaller images, a shorter history, or a lower max_new_tokens"
            )

    def _generate(self, inputs, settings, streamer, stop, owner, outcome: dict) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        common = {
            "input_ids": inputs.input_ids,
            "attention_mask": inputs.attention_mask,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer": tokenizer,  # for stop strings
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenSet(stop)]),
            **settings.generate_kwargs(),
        }
        if self.reuse is not None:
            return self._generate_reusing(inputs, common, owner, outcome)
        if self.chunk_size is None:
            return self.model.generate(
                images=inputs.images,
                images_seq_mask=inputs.images_seq_mask,
                images_spatial_crop=inputs.images_spatial_crop,
                **common,
            )
        embeds, cache = self.model.incremental_prefilling(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            images=inputs.images,
            images_seq_mask=inputs.images_seq_mask,
            images_spatial_crop=inputs.images_spatial_crop,
            chunk_size=self.chunk_size,
        )
        return self.model.generate(inputs_embeds=embeds, cache=cache, **common)

    def _generate_reusing(self, inputs, common: dict, owner: Hashable | None, outcome: dict) -> torch.Tensor:
        """Continue the kept cache that shares the prompt's longest prefix, then keep this prompt's cache.

        The prompt's suffix is prefilled in chunks starting where the kept prefix ends: the result is a
        chunked prefill split there. Kept image runs are placed without running the vision tower.
        """
        context = model_context(self.model)
        spans, runs = prompt_image_runs(self.model, self.reuse, inputs, context)
        length = inputs.input_ids.shape[1]
        key = PromptKey(tuple(inputs.input_ids[0].tolist()), spans, (context, self.chunk_size))
        cache, outcome["reused_tokens"] = self.reuse.take_prefix(key, limit=length - 1)
        embeds = self.model.place_image_runs(inputs.input_ids, inputs.images_seq_mask, [runs])
        embeds, cache = self.model.incremental_prefilling(
            inputs_embeds=embeds,
            attention_mask=inputs.attention_mask,
            chunk_size=self.chunk_size or length,
            cache=cache,
        )
        sequences = self.model.generate(inputs_embeds=embeds, cache=cache, **common)
        self.reuse.keep_prefix(key, cache, owner)
        return sequences


def _copy_history(history: Sequence[dict] | None) -> list[dict]:
    """A copy of the earlier messages, checked here because a bad shape fails obscurely later."""
    if history is None:
        return []
    if isinstance(history, ChatResult):
        raise TypeError("history must be a list of messages: pass result.history, not the ChatResult")
    return [dict(message) for message in checked_messages(history, "history")]


def default_image_dir() -> Path:
    """The repository's images/ folder (sample images), found next to the package, not the cwd."""
    return Path(__file__).resolve().parent.parent / "images"
