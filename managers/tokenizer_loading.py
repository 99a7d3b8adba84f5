"""The one place the tokenizer is loaded (tokenizer manager, scheduler,
detokenizer), so all three read it with the same settings: a checkpoint whose
tokenizer class ships as code (auto_map) loads only with --trust-remote-code,
and a flag honoured by one process but not another would fail half-way
through start-up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from managers.process_config import TokenizerConfig


def load_tokenizer(config: TokenizerConfig) -> Any:
    from transformers import AutoTokenizer  # slow import: only in the processes that need it

    return AutoTokenizer.from_pretrained(config.path, trust_remote_code=config.trust_remote_code)
