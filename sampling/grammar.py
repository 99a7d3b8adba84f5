"""Grammar-constrained decoding with xgrammar.

A request asks for one grammar through its sampling parameters
(`json_schema`, `regex`, `ebnf`, `structural_tag`, SGLang's names). The
HTTP side checks the grammar's syntax before queueing (`check_grammar`: a
400 with the compiler's message); the scheduler compiles it against the
vocabulary on a thread pool (`GrammarCompilers`, cached by grammar text), the
request waiting meanwhile without holding anyone else up, and then samples
through a `GrammarProcessor`: each step the matcher fills the request's row
of the allowed-token bitmask (after the previous token was accepted, while
the next forward runs under overlap) and advances on every kept token; the
request finishes once the grammar is complete.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sampling.logits_processors import LogitAdjustments

GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
GRAMMAR_BACKENDS = ("xgrammar", "none")
# xgrammar's messages start with "[time] /path/file.cc:line: "; users need the rest.
_LOCATION_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of GRAMMAR_FIELDS
    text: str


def grammar_spec_of(params: Any) -> GrammarSpec | None:
    """The grammar a request's sampling params ask for (at most one)."""
    given = [(f, getattr(params, f)) for f in GRAMMAR_FIELDS if getattr(params, f, None) is not None]
    if len(given) > 1:
        raise ValueError(f"at most one of {', '.join(GRAMMAR_FIELDS)} may be given, got {', '.join(f for f, _ in given)}")
    return GrammarSpec(*given[0]) if given else None


def structural_tag_text(text: str) -> str:
    """SGLang's structural tag (`structures` with begin / schema / end, plus
    `triggers`) in the `format` form xgrammar reads; the latter passes as is."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"structural_tag is not valid JSON: {err}") from None
    if not isinstance(tag, dict) or "format" in tag or "structures" not in tag:
        return text
    tags = [{"begin": s.get("begin", ""), "end": s.get("end", ""),
             "content": {"type": "json_schema", "json_schema": s.get("schema", {})}} for s in tag["structures"]]
    return json.dumps({"type": "structural_tag",
                       "format": {"type": "triggered_tags", "triggers": tag.get("triggers", []), "tags": tags}})


def _content_format(spec: GrammarSpec) -> dict:
    """A grammar as a structural-tag element."""
    if spec.kind == "json_schema":
        return {"type": "json_schema", "json_schema": json.loads(spec.text)}
    if spec.kind == "regex":
        return {"type": "regex", "pattern": spec.text}
    if spec.kind == "ebnf":
        return {"type": "grammar", "grammar": spec.text}
    return json.loads(structural_tag_text(spec.text))["format"]


def after_reasoning(spec: GrammarSpec, reasoning_parser: str) -> GrammarSpec:
    """`spec` applied only to the answer: free reasoning first, as the
    reasoning parser reads it (qwen3: an optional leading <think> block;
    deepseek-r1: the output opens inside it), then the grammar."""
    answer = _content_format(spec)
    gap = {"type": "regex", "pattern": "[ \\n]*"}  # models put blank lines after </think>
    if reasoning_parser == "deepseek-r1":
        thought = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": "</think>"}
        fmt: dict = {"type": "sequence", "elements": [thought, gap, answer]}
    else:
        thought = {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"}
        fmt = {"type": "or", "elements": [{"type": "sequence", "elements": [thought, gap, answer]}, answer]}
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def _compiler_message(err: Exception) -> str:
    return _LOCATION_PREFIX.sub("", str(err).strip()).strip()


def check_grammar(spec: GrammarSpec) -> None:
    """Parse the grammar without a vocabulary: ValueError with the compiler's
    message when it cannot compile."""
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            json.loads(spec.text)
            xgr.Grammar.from_json_schema(spec.text)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.text)
        elif spec.kind == "ebnf":
            xgr.Grammar.from_ebnf(spec.text)
        else:
            xgr.Grammar.from_structural_tag(structural_tag_text(spec.text))
    except json.JSONDecodeError as err:
        raise ValueError(f"json_schema is not valid JSON: {err}") from None
    except Exception as err:  # noqa: BLE001 -- xgrammar raises RuntimeError / its own types
        raise ValueError(f"{spec.kind} does not compile: {_compiler_message(err)}") from None


class GrammarCompilers:
    """One scheduler's xgrammar compiler, used from a thread pool; compiled
    grammars are cached by their spec (LRU, `cache_size` entries)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], any_whitespace: bool = True,
                 threads: int = 2, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.any_whitespace = any_whitespace
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar-compile")
        self.cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self.cache_size = cache_size
        self._compiler = None
        self._compiler_lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar (at once if cached)."""
        future = self.cache.get(spec)
        if future is not None and not (future.done() and future.exception() is not None):
            self.cache.move_to_end(spec)
            return future
        future = self.pool.submit(self._compile, spec)
        self.cache[spec] = future
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return future

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _compiler_for_thread(self):
        # Built on first use, on a pool thread: the vocabulary scan stays off the scheduler loop.
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def _compile(self, spec: GrammarSpec):
        compiler = self._compiler_for_thread()
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.text, any_whitespace=self.any_whitespace)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.text)
            if spec.kind == "ebnf":
                return compiler.compile_grammar(spec.text)
            return compiler.compile_structural_tag(structural_tag_text(spec.text))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{spec.kind} does not compile: {_compiler_message(err)}") from None


class GrammarProcessor:
    """A request's matcher as a logits processor (sampling/logits_processors.py)."""

    reads_output = True

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def fill(self, adjustments: LogitAdjustments, row: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(adjustments.allowed_bitmask(), row)

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token_id)

    def terminated(self) -> bool:
        return self.matcher.is_terminated()
