"""The one place the tokenizer is loaded (tokenizer manager, scheduler,
detokenizer), so all three read it with the same settings: a checkpoint whose
tokenizer class ships as code (auto_map) loads only with --trust-remote-code,
and a flag honoured by one process but not another would fail half-way
through start-up."""

from __future__ import annotations

from typing import Any


def load_tokenizer(server_args: Any) -> Any:
    """`server_args` is a runtime.server_args.ServerArgs (typed loosely:
    managers must not import runtime)."""
    from transformers import AutoTokenizer  # slow import: only in the processes that need it

    return AutoTokenizer.from_pretrained(
        server_args.tokenizer_path, trust_remote_code=server_args.trust_remote_code
    )
