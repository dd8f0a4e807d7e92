"""Turn a built checkpoint into one that answers every prompt with a fixed text.

Random weights answer gibberish, so they cannot show that a grounding answer is drawn on the
right image end to end (CLI ``--save_vis``, the web demo's overlay). A scripted checkpoint can: its
decoder layers add nothing to the residual stream, so the last hidden state is the normalised
embedding of the current token, and the output head maps each token of the script to the next one.
The whole pipeline (tiling, vision tower, projector, cache, sampling) still runs for real.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from ..models.conversation import USER
from ..models.modeling import DeepseekVLV2ForCausalLM
from ..models.processing import DeepseekVLV2Processor

_LOGIT = 30.0  # next-token logit of the script; everything else stays near 0


def script_checkpoint(path: str | os.PathLike, answer: str, extra_tokens: tuple[str, ...] = ()) -> Path:
    """Rewrite the checkpoint in ``path`` so that it answers ``answer`` (then EOS) to any prompt.

    Each token of the answer must be distinct (a token decides alone what comes next); pass pieces
    such as ``"[[100, 200, 500, 600]]"`` in ``extra_tokens`` to add them to the tokenizer whole.
    """
    path = Path(path)
    if extra_tokens:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in extra_tokens])
        tokenizer.save(str(path / "tokenizer.json"))
    processor = DeepseekVLV2Processor.from_pretrained(path)
    tokenizer = processor.tokenizer
    prompt = processor(conversations=[{"role": USER, "content": "x"}], images=None)
    chain = [int(prompt.input_ids[0, -1])] + tokenizer.encode(answer, add_special_tokens=False)
    chain.append(tokenizer.eos_token_id)
    if len(set(chain)) != len(chain):
        raise ValueError(f"the answer's tokens (and the prompt's last token) must be distinct: {chain}")

    config_json = (path / "config.json").read_text()
    model = DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    hidden = model.config.language_config.hidden_size
    if len(chain) > hidden:
        raise ValueError(f"a script of {len(chain)} tokens needs a hidden size of at least that, not {hidden}")
    if max(chain) >= model.config.language_config.vocab_size:
        raise ValueError("the extra tokens do not fit in the checkpoint's embedding table")
    with torch.no_grad():
        for name, parameter in model.language.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                parameter.zero_()
        embed = model.language.get_input_embeddings().weight
        head = model.language.get_output_embeddings().weight
        for step, token in enumerate(chain):
            embed[token] = torch.nn.functional.one_hot(torch.tensor(step), hidden).float()
        for step, (token, following) in enumerate(zip(chain, chain[1:])):
            head[following] = torch.nn.functional.one_hot(torch.tensor(step), hidden).float() * _LOGIT / hidden**0.5
    model.save_pretrained(path)
    (path / "config.json").write_text(config_json)  # keep the published-format config
    (path / "generation_config.json").unlink(missing_ok=True)
    return path
