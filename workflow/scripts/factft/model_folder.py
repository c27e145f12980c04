"""What a model folder must hold to be loaded: checked as the workflow starts, for a config's
local folder (factft.config.check_local_models), and as a job loads one (factft.models).
No torch here: the Snakefile imports it."""

from __future__ import annotations

import json
from pathlib import Path

from factft.errors import FactftError

# What a tokenizer loads from (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def check_model_folder(spec: dict) -> None:
    """Fail early, naming the model, when its folder holds nothing we are allowed to load."""
    name, path = spec["name"], Path(spec["path"])
    if not path.is_dir():
        raise FactftError(
            f"model '{name}': folder {path} does not exist; run `snakemake download_models` where "
            f"there is internet, or set models.{name}.source.path to a local model folder"
        )
    gguf = spec.get("gguf_file")
    if gguf:
        if not (path / gguf).is_file():
            raise FactftError(
                f"model '{name}': GGUF file {gguf} (models.{name}.source.gguf_file) is not in {path}; "
                f"files there: {sorted(p.name for p in path.iterdir())[:10]}"
            )
        return
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FactftError(
            f"model '{name}': no safetensors weights in {path} (found {found}); only *.safetensors "
            "or a GGUF file are loaded, since pickled .bin weights can run code: convert the "
            f"weights, or set models.{name}.source.path / gguf_file to a folder that has them"
        )
    check_tokenizer_files(name, path)
    if spec.get("chat") and not has_chat_template(path):
        raise FactftError(
            f"model '{name}': models.{name}.chat is on, but {path} holds no chat template "
            "(chat_template.jinja, or chat_template in tokenizer_config.json): is it an instruction-tuned model?"
        )


def check_tokenizer_files(name: str, folder: Path) -> None:
    """transformers' own error for a folder without tokenizer files would blame a missing
    package (sentencepiece or tiktoken)."""
    if not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        files = sorted(p.name for p in folder.iterdir())[:12]
        raise FactftError(
            f"model '{name}': no tokenizer files in {folder} (files: {files}); save the model's tokenizer "
            f"there (tokenizer.json, or tokenizer.model / vocab.json + merges.txt with tokenizer_config.json), "
            f"or set models.{name}.source.path to a folder that has one"
        )


def has_chat_template(path: Path) -> bool:
    """Whether a model folder ships a chat template, in either of the places transformers reads."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
