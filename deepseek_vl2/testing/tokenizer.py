"""Small offline stand-ins for the published DeepSeek tokenizers, for tests and look-alike checkpoints.

They are byte-level BPE tokenizers with DeepSeek's pre-tokenizer and special tokens, trained in a
few milliseconds on a built-in English text, and written in the published files' format
(tokenizer.json, tokenizer_config.json naming ``LlamaTokenizerFast``, special_tokens_map.json).
Two flavors place the special tokens where the published tokenizers do, so that tests can prove
no token id is hard-coded:

- ``"tiny"`` (deepseek-vl2-tiny and -base): BOS 0, EOS 1, pad 2, then the learned vocabulary.
- ``"small"`` (deepseek-vl2-small, a DeepSeek-V2 tokenizer): the learned vocabulary first, then
  BOS, EOS and a few more special tokens; no pad token (the processor adds one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..models.conversation import EOS, PAD

BOS = "<｜begin▁of▁sentence｜>"
# DeepSeek-V2's fill-in-the-middle tokens, which follow EOS in the small flavor.
FIM_TOKENS = ("<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>")

FLAVORS = ("tiny", "small")
_VOCAB_SIZE = {"tiny": 640, "small": 600}

# DeepSeek's pre-tokenizer: digits in groups of up to three, CJK runs, then words and punctuation.
_WORDS_AND_PUNCTUATION = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
Describe this image in detail. What is in the picture? The image shows a small red house next to a
tall green tree, and a dog is sleeping on the grass in front of the door. There are two people
walking along the road, and the sky is blue with a few white clouds. Please read the text in the
table and convert it into markdown format. The chart compares the sales of three products over
the last twelve months: the first product sold 1200 units, the second 850 and the third 430.
Where is the cat? Locate the person wearing a yellow jacket and give the bounding box. Count the
number of cars in the parking lot. What does the sign say? The sign says that the store opens at
nine in the morning and closes at six in the evening. Answer the question using a single word or
phrase. Is there a bicycle in the image? Yes, there is a bicycle leaning against the wall on the
left side of the photo. Explain the joke in this meme. Translate the caption into English. The
document is a receipt from a coffee shop with the date, the total price and the list of items.
Thank you! You are a helpful assistant. Please think step by step and answer truthfully.
"""


def build_tokenizer(save_dir: str | os.PathLike, flavor: str = "tiny") -> PreTrainedTokenizerFast:
    """Train a ``flavor`` tokenizer, write its files to ``save_dir`` and load it back from there.

    Building twice gives the same files. The processor adds its own tokens on top, so size a
    model's vocabulary with ``len(processor.tokenizer)`` after creating the processor.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"unknown tokenizer flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[一-龥぀-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORDS_AND_PUNCTUATION), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    leading_specials = [BOS, EOS, PAD] if flavor == "tiny" else []
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE[flavor],
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in leading_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    if flavor == "small":
        trailing_specials = (BOS, EOS, *FIM_TOKENS)
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in trailing_specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    tokenizer.save(str(save_dir / "tokenizer.json"))

    specials = {"bos_token": BOS, "eos_token": EOS}
    if flavor == "tiny":
        specials["pad_token"] = PAD
    added_tokens = json.loads(tokenizer.to_str())["added_tokens"]
    # How each token is matched (content, strip and normalization flags), as the HF files list it.
    matching = {
        token["content"]: {key: value for key, value in token.items() if key not in ("id", "special")}
        for token in added_tokens
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(token["id"]): {**matching[token["content"]], "special": token["special"]} for token in added_tokens
        },
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
        **specials,
    }
    _write_json(save_dir / "tokenizer_config.json", config)
    _write_json(
        save_dir / "special_tokens_map.json",
        {name: matching[token] for name, token in specials.items()},
    )
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
