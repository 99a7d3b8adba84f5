"""--trust-remote-code reaches every transformers loader: a real tiny
checkpoint whose config and tokenizer classes ship as code (auto_map) loads
and generates with the flag, and is refused without it."""

from __future__ import annotations

import json
import shutil

import pytest

from managers.tokenizer_loading import load_tokenizer
from model_executor.model_config import ModelConfig
from runtime import Engine
from runtime.server_args import ServerArgs

# A model_type transformers does not know, so only the shipped class can read it.
CONFIG_CODE = """
from transformers import Qwen3Config


class RadixTestConfig(Qwen3Config):
    model_type = "radix_remote_code_test"
"""

TOKENIZER_CODE = """
from transformers import PreTrainedTokenizerFast


class RadixTestTokenizerFast(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture(scope="module")
def remote_code_model(tiny_qwen3, tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "radix_remote_code_model"
    shutil.copytree(tiny_qwen3, path)
    (path / "configuration_radix_test.py").write_text(CONFIG_CODE)
    (path / "tokenization_radix_test.py").write_text(TOKENIZER_CODE)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "radix_remote_code_test"
    config["auto_map"] = {"AutoConfig": "configuration_radix_test.RadixTestConfig"}
    (path / "config.json").write_text(json.dumps(config))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "RadixTestTokenizerFast"
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_radix_test.RadixTestTokenizerFast"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    return path


def test_config_loader_gets_the_flag(remote_code_model):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        ModelConfig.from_pretrained(str(remote_code_model), "float32", None, "cpu")
    config = ModelConfig.from_pretrained(str(remote_code_model), "float32", None, "cpu", trust_remote_code=True)
    assert type(config.hf_config).__name__ == "RadixTestConfig"


def test_tokenizer_loader_gets_the_flag(remote_code_model):
    args = lambda trust: ServerArgs(model_path=str(remote_code_model), device="cpu", trust_remote_code=trust)  # noqa: E731
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_tokenizer(args(False).tokenizer_config())
    assert type(load_tokenizer(args(True).tokenizer_config())).__name__ == "RadixTestTokenizerFast"
    assert args(True).model_runner_config().trust_remote_code
    # What each child process gets carries it too.
    assert args(True).scheduler_process_config(0).tokenizer.trust_remote_code
    assert args(True).detokenizer_process_config().tokenizer.trust_remote_code


def test_engine_needs_the_flag(remote_code_model):
    # The scheduler (config + tokenizer), the detokenizer and the tokenizer
    # manager each load from the checkpoint: all must get the flag.
    kwargs = dict(model_path=str(remote_code_model), dtype="float32", max_total_tokens=2048, device="cpu")
    with pytest.raises(RuntimeError, match="trust_remote_code=True"):
        Engine(**kwargs)
    with Engine(**kwargs, trust_remote_code=True) as engine:
        out = engine.generate("The cat sat", {"max_new_tokens": 4, "temperature": 0})
    assert out["meta_info"]["completion_tokens"] == 4 and out["text"]
