"""Loading is safe: no remote code unless a model opts in, weights from safetensors only, no
pickle that can run code, and an HF token that stays in the environment or the HF cache.

(The end-to-end check that a token in the environment reaches no file is in test_determinism,
which runs the shrunken demo anyway.)
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from snakemake.utils import validate

from factft.config import SCHEMA, check_config
from factft.errors import FactftError
from factft.models import load_model
from factft.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted((ROOT / "workflow/scripts").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))


def spec(folder, **extra) -> dict:
    return {"name": "tiny", "path": str(folder), "gguf_file": None, "trust_remote_code": False, **extra}


class RunsCode:
    """A pickle that creates a file when it is unpickled: what a hostile .bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def hostile_pickle(path: Path, marker: Path) -> None:
    torch.save({"weight": RunsCode(marker)}, path)


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


# ---- remote code ---------------------------------------------------------------------------


def test_remote_code_is_off_for_every_model_unless_its_config_opts_in():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["models"]["mistral-7b"]["trust_remote_code"] = True
    validate(config, str(SCHEMA))
    check_config(copy.deepcopy(config))
    assert config["models"]["llama2-7b"]["trust_remote_code"] is False
    assert config["models"]["mistral-7b"]["trust_remote_code"] is True


def test_a_model_that_opts_in_to_remote_code_loads_with_a_warning_naming_it(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="factft.models"):
        load_model(spec(tiny_model_dir), device="cpu")
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="factft.models"):
        load_model(spec(tiny_model_dir, trust_remote_code=True), device="cpu")
    assert "model 'tiny': trust_remote_code is on: running the model folder's own Python code" in caplog.text


def test_no_code_turns_remote_code_on_by_itself():
    """trust_remote_code only ever comes from the model's config (models.<name>.trust_remote_code)."""
    literal = []
    for path in CODE:
        for call in calls(path):
            value = keyword(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is not False:
                literal.append(f"{path.relative_to(ROOT)}:{call.lineno}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if getattr(key, "value", None) == "trust_remote_code" and isinstance(value, ast.Constant):
                        if value.value is not False:
                            literal.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert literal == []


# ---- safetensors only, no pickles ----------------------------------------------------------


def test_a_model_folder_with_only_pickled_weights_is_refused_without_unpickling_them(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder)
    marker = tmp_path / "code-ran"
    hostile_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(FactftError, match=r"model 'tiny': no safetensors weights in .*pickled \.bin weights can run code"):
        load_model(spec(folder), device="cpu")
    assert not marker.exists()


def test_safetensors_are_loaded_even_when_a_pickle_lies_beside_them(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    hostile_pickle(folder / "pytorch_model.bin", marker)
    model, _ = load_model(spec(folder), device="cpu")
    assert not marker.exists()
    # The weights are the safetensors file's, every one of them.
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_an_adapter_with_only_a_pickled_weights_file_is_refused_without_unpickling_it(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    marker = tmp_path / "code-ran"
    hostile_pickle(adapter / "adapter_model.bin", marker)
    with pytest.raises(FactftError, match=r"has no adapter_model\.safetensors .*pickled \.bin weights can run code"):
        load_model(spec(tiny_model_dir), adapter, device="cpu")
    assert not marker.exists()


def test_a_checkpoint_cannot_run_code_when_a_job_resumes_from_it(tiny_model_dir, tmp_path):
    model, _ = load_model(spec(tiny_model_dir), device="cpu", for_training=True)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, checkpoint / "trainable.safetensors")
    marker = tmp_path / "code-ran"
    hostile_pickle(checkpoint / "optimizer.pt", marker)
    with pytest.raises(FactftError, match=r"cannot be read \(UnpicklingError: Weights only load failed"):
        load_checkpoint(checkpoint, model, optimizer)
    assert not marker.exists()


def test_every_torch_load_passes_weights_only_true():
    loads = [(path, call) for path in CODE for call in calls(path) if getattr(call.func, "attr", None) == "load"
             and getattr(call.func.value, "id", None) == "torch"]  # fmt: skip
    assert loads, "the scan found no torch.load at all: is it looking at the right files?"
    unsafe = [
        f"{path.relative_to(ROOT)}:{call.lineno}"
        for path, call in loads
        if not (isinstance(keyword(call, "weights_only"), ast.Constant) and keyword(call, "weights_only").value is True)
    ]
    assert unsafe == []


def test_no_code_unpickles_or_imports_weights_by_other_means():
    found = []
    for path in CODE:
        text = path.read_text()
        for needle in ("pickle.load", "pickle.loads", "joblib.load", "use_safetensors=False", "weights_only=False"):
            if needle in text:
                found.append(f"{path.relative_to(ROOT)}: {needle}")
    assert found == []


# ---- the HF token --------------------------------------------------------------------------


def test_no_code_passes_a_token_the_hub_client_reads_from_the_environment_or_its_cache():
    """huggingface_hub and datasets read HF_TOKEN or the cache themselves; passing one on
    would put it in our call arguments, where a log line or an error message can show it."""
    passed = [
        f"{path.relative_to(ROOT)}:{call.lineno}"
        for path in CODE
        for call in calls(path)
        if any(k.arg in ("token", "use_auth_token") for k in call.keywords)
    ]
    assert passed == []
    # Nor does any code read the token itself (an error message may name HF_TOKEN, as advice).
    reading = re.compile(r"(environ(\.get)?|getenv)\s*[\[(]\s*['\"]HF_TOKEN")
    assert [path.name for path in CODE if reading.search(path.read_text())] == []


@pytest.mark.parametrize(
    "place",
    [
        lambda config: config,
        lambda config: config["models"]["llama2-7b"]["source"],
        lambda config: config["datasets"]["popqa"]["source"],
    ],
    ids=["top-level", "model-source", "dataset-source"],
)
def test_the_config_has_no_place_for_a_token(place):
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    place(config)["token"] = "hf_x"
    with pytest.raises(Exception, match=r"Additional properties are not allowed \('token' was unexpected\)"):
        validate(config, str(SCHEMA))
