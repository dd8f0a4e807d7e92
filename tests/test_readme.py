"""The README's notebook examples run as written, on a built tiny checkpoint instead of the hub id."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
HUB_ID_LINE = 'model_path = "deepseek-ai/deepseek-vl2-tiny"'


def readme_examples() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- readme-example: (.+?) -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_promised_examples():
    names = [name for name, _ in readme_examples()]
    assert names == ["one image with grounding", "three images with incremental prefilling", "chat API"]


def test_readme_examples_run_in_order(checkpoint_dir, monkeypatch, capsys):
    path = checkpoint_dir("tiny")
    monkeypatch.chdir(ROOT)  # the examples name images/ relative to the repository, as a user would
    namespace: dict = {}
    for name, code in readme_examples():
        if HUB_ID_LINE in code:
            code = code.replace(HUB_ID_LINE, f"model_path = {str(path)!r}")
        exec(compile(code, f"README example: {name}", "exec"), namespace)
    assert isinstance(namespace["answer"], str)
    assert namespace["inputs_embeds"].shape[1] == namespace["inputs"].input_ids.shape[1]
    result = namespace["result"]
    assert result.prompt.startswith("<|User|>") and result.images[-1].size == (720, 480)
    output = capsys.readouterr().out
    assert "<|User|>: <image>\n<|ref|>The red car<|/ref|>." in output
