"""The README's TRL snippet, run as written on a tiny model: `messages` wins over
``dataset_text_field`` until it is removed; then TRL trains on the `text` column."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import need_tool

try:
    import torch  # noqa: F401
    import trl  # noqa: F401
except ImportError:
    need_tool("TRL and torch are not installed (pip install -e '.[train,dev]')")

from saige_k8s.dataset.extract import ExtractRequest, extract
from saige_k8s.experiences.demo import DemoOptions, create_database
from saige_k8s.training.data import load_dataset_dir
from tests.tiny_model import build_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
#: A minimal chat template, so that the tiny model can render `messages` as TRL asks.
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if 'remove_columns(["messages"])' in b]
    return block


def test_the_readme_trl_snippet_trains_on_text_only_without_messages(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    create_database(str(tmp_path / "saige.db"), DemoOptions(rows=300, seed=2, response_median_bytes=60))
    result = extract(
        ExtractRequest(db=str(tmp_path / "saige.db"), data_root=tmp_path / "data", format="mistral", dataset_id="d")
    )
    texts = [str(row) for row in load_dataset_dir(result.path).train[:200]]
    model = build_tiny_model(tmp_path / "model", texts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)

    code = _snippet()
    settings = {
        "root": f'root = Path("{tmp_path / "data" / "datasets"}")',
        "model": f'model = "{model}"',
        "config": f'config = SFTConfig(output_dir="{tmp_path / "trl"}", max_steps=2, per_device_train_batch_size=2, '
        'max_length=128, use_cpu=True, report_to=[], save_strategy="no", bf16=False)',
    }
    for name, line in settings.items():
        code, n = re.subn(rf"^{name} = .*$", line.replace("\\", "\\\\"), code, count=1, flags=re.M)
        assert n == 1, name
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's own block

    train = scope["train"]

    def trained_on(trainer) -> str:
        return tokenizer.decode(trainer.train_dataset[0]["input_ids"], skip_special_tokens=True)

    # The messages column, through the chat template, not the text column's [INST] format.
    assert "[INST]" not in trained_on(scope["on_messages"])
    # The claim: dataset_text_field="text" alone does not make TRL read `text`.
    config = scope["config"]
    assert config.dataset_text_field == "text"
    ignored = scope["SFTTrainer"](model=str(model), args=config, train_dataset=train)
    assert "[INST]" not in trained_on(ignored)
    # Without messages, TRL trains on the text column, as rendered by saige-k8s, and train() ran.
    on_text = scope["on_text"]
    assert "[INST]" in trained_on(on_text)
    assert on_text.state.global_step == 2
