"""The generation loop over one exported graph: streaming, listeners and the safety filter.

`InferenceSession` runs a graph it is given (with its tokenizer). The public `LlmInference`
(pipelines/run.py) adds the reference API's constructors, which first resolve a model file
into a graph: the runtime itself never exports or reads checkpoints.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.chat_template import chat_messages
from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.lora_file import LoraFile
from llmtool.formats.tflite_model import read_metadata
from llmtool.runtime.engine import Engine, EngineBase
from llmtool.runtime.sampler import Sampler, validate_sampling
from llmtool.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 512
Prompt = str | list[dict[str, Any]]  # text, or chat messages [{"role": ..., "content": ...}]
ResultListener = Callable[[str, bool], None]
ErrorListener = Callable[[Exception], None]


@dataclass
class LlmInferenceOptions:
    """Options of the reference API (snake_case), plus a few desktop extras."""

    model_path: str | None = None  # None: the embedded default model
    max_tokens: int | None = None  # input + output tokens; None: 512, capped at the model's
    top_k: int = 40
    temperature: float = 0.8
    random_seed: int = 0
    lora_path: str | None = None  # a LoRA file (llmtool lora-convert); see set_lora()
    result_listener: ResultListener | None = None
    error_listener: ErrorListener | None = None
    context_window: int | None = None  # prompt tokens kept; default max_tokens // 2
    num_threads: int | None = None
    safety_filter: list[str] = field(default_factory=list)  # refuse / stop on these words

    def validate(self) -> None:
        """Every option's type and range; the messages are the CLI's (one line each)."""
        if self.model_path is not None and not isinstance(self.model_path, (str, os.PathLike)):
            raise LlmToolError(f"model_path must be a path (got {_kind(self.model_path)})")
        check_int("max tokens", self.max_tokens, minimum=2, optional=True)
        check_int("top-k", self.top_k, minimum=1)
        check_int("random seed", self.random_seed)
        check_int("context window", self.context_window, minimum=1, optional=True)
        check_int("num threads", self.num_threads, 1, max_threads(), optional=True)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, Real):
            raise LlmToolError(f"temperature must be a number (got {_kind(self.temperature)})")
        validate_sampling(self.top_k, self.temperature)
        for name in ("result_listener", "error_listener"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise LlmToolError(f"{name} must be a function (got {_kind(value)})")
        words = self.safety_filter
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise LlmToolError("safety_filter must be a list of words (str)")


def max_threads() -> int:
    """The most interpreter threads accepted: 4 per core (more only thrashes, and very large
    counts crash the native runtime)."""
    return 4 * (os.cpu_count() or 1)


def _kind(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def check_int(
    name: str,
    value: object,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
) -> None:
    """A one-line LlmToolError unless value is an int (not a bool) within [minimum, maximum]."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise LlmToolError(f"{name} must be a whole number (got {_kind(value)})")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise LlmToolError(f"{name} must be between {minimum} and {maximum} (got {value})")
    if minimum is not None and value < minimum:
        raise LlmToolError(f"{name} must be at least {minimum} (got {value})")


def clean_text(text: object, what: str = "the prompt") -> str:
    """A str safe to tokenize: lone surrogates (undecodable bytes that reached Python through
    argv or surrogateescape) become U+FFFD, as a UTF-8 decoder with errors="replace" does."""
    if not isinstance(text, str):
        hint = (
            "; decode it first, e.g. data.decode('utf-8', 'replace')"
            if isinstance(text, (bytes, bytearray))
            else ""
        )
        raise LlmToolError(f"{what} must be a str (got {type(text).__name__}){hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def clean_prompt(prompt: object) -> Any:
    """A str prompt (see clean_text), or a list of {"role": str, "content": str} messages."""
    if isinstance(prompt, list):
        out = []
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
                raise LlmToolError(
                    'a chat prompt must be a list of {"role": str, "content": str} messages'
                )
            out.append({**m, "content": clean_text(m.get("content", ""), "a message's content")})
        return out
    return clean_text(prompt)


# Sessions with generate_response_async work in flight; finished (joined) at interpreter exit.
_live_sessions: weakref.WeakSet[InferenceSession] = weakref.WeakSet()


def _finish_all_sessions() -> None:
    """At interpreter exit: cancel and join background generations before the runtime's native
    objects are torn down (a thread still inside LiteRT then aborts the process)."""
    for session in list(_live_sessions):
        session._stop_workers()


if hasattr(threading, "_register_atexit"):  # runs before non-daemon threads are joined
    threading._register_atexit(_finish_all_sessions)
else:  # pragma: no cover - older interpreters
    atexit.register(_finish_all_sessions)


@dataclass
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    stop_reason: str  # "stop_token" | "max_tokens" | "safety_filter" | "cancelled"
    prompt_truncated: int  # prompt tokens dropped to fit the context window
    prefill_seconds: float
    decode_seconds: float

    def as_dict(self) -> dict[str, Any]:
        n_prompt, n_out = len(self.prompt_token_ids), len(self.token_ids)
        return {
            "text": self.text,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "stop_reason": self.stop_reason,
            "prompt_truncated": self.prompt_truncated,
            "timings": {
                "prefill_seconds": round(self.prefill_seconds, 4),
                "decode_seconds": round(self.decode_seconds, 4),
                "prefill_tokens_per_second": _rate(n_prompt, self.prefill_seconds),
                "decode_tokens_per_second": _rate(max(n_out - 1, 0), self.decode_seconds),
            },
        }


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 2) if seconds > 0 and n else None


class SafetyFilter:
    """Whole-word, case-insensitive match against a word list (the reference app's filter)."""

    def __init__(self, words: list[str]):
        words = [w.strip() for w in words if w.strip() and not w.strip().startswith("#")]
        self.words = words
        self._re = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
            if words
            else None
        )

    @classmethod
    def from_file(cls, path: str | Path) -> SafetyFilter:
        p = Path(path)
        try:
            return cls(p.read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError) as exc:
            raise LlmToolError(f"cannot read word list ({exc})", p) from None

    def find(self, text: str) -> re.Match[str] | None:
        return self._re.search(text) if self._re else None


def open_engine(graph_path: Path, num_threads: int | None) -> EngineBase:
    """LiteRT's CompiledModel engine (in-place KV cache, one shared packed copy of the
    weights), or the classic Interpreter where only that is installed."""
    if importlib.util.find_spec("ai_edge_litert.compiled_model") is None:
        return Engine(graph_path, num_threads)
    from llmtool.runtime.compiled_engine import CompiledEngine

    return CompiledEngine(graph_path, num_threads)


class InferenceSession:
    """Generate text with one exported graph on LiteRT (see pipelines/run.py's LlmInference
    for opening a model file by name)."""

    def __init__(
        self,
        options: LlmInferenceOptions,
        engine: EngineBase,
        tokenizer: Tokenizer,
        graph_path: Path,
        max_tokens: int,
    ):
        self.max_tokens = max_tokens  # the effective limit: options.max_tokens or the default
        self.options = options
        self.engine = engine
        self.tokenizer = tokenizer
        self.graph_path = graph_path
        self.safety = SafetyFilter(options.safety_filter)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._workers: set[threading.Thread] = set()
        self._closed = False
        self.lora_path: Path | None = None  # the adapter in use (None: the base model)

    @functools.cached_property
    def _graph_metadata(self) -> dict[str, bytes]:
        """The graph's metadata, read when an adapter is checked (not by a run without one)."""
        metadata, _ = read_metadata(self.graph_path)
        return metadata

    @property
    def base_identity(self) -> str | None:
        """The identity of the base weights the graph was exported from (LoRA files name it)."""
        identity = self._graph_metadata.get(keys.BASE_IDENTITY)
        return identity.decode() if identity else None

    @property
    def model_type(self) -> str | None:
        spec = self._graph_metadata.get(keys.MODEL_SPEC)
        return json.loads(spec).get("model_type") if spec else None

    @classmethod
    def from_graph(
        cls, graph_path: Path, tokenizer: Tokenizer, options: LlmInferenceOptions
    ) -> InferenceSession:
        """Open an engine on the graph; max tokens defaults to 512 capped at its KV cache."""
        options.validate()
        engine = open_engine(graph_path, options.num_threads)
        if options.max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, engine.max_seq_len)
        elif options.max_tokens > engine.max_seq_len:
            engine.close()
            raise LlmToolError(
                f"max tokens {options.max_tokens} exceeds what this model handles "
                f"({engine.max_seq_len} tokens: its context length or the graph's KV cache)",
                options.model_path,
            )
        else:
            max_tokens = options.max_tokens
        window = options.context_window
        if window is not None and not 1 <= window < max_tokens:
            engine.close()
            raise LlmToolError(
                f"context window must be between 1 and max tokens - 1 ({max_tokens - 1}), "
                f"got {window}"
            )
        session = cls(options, engine, tokenizer, graph_path, max_tokens)
        if options.lora_path is not None:
            try:
                session.set_lora(options.lora_path)
            except BaseException:
                session.close()
                raise
        return session

    # -- LoRA -------------------------------------------------------------------------------------

    def set_lora(self, lora_path: str | Path | None) -> None:
        """Use this LoRA file from the next generation on, or the base model for None.

        Only the graph's LoRA inputs are written (tens of milliseconds): the base weights are
        neither re-read nor re-packed. The graph must take adapters of this rank and targets
        (pipelines/run.py's LlmInference re-exports a converted model when it does not).
        """
        with self._lock:
            if lora_path is None:
                self.engine.set_lora_inputs(None)
                self.lora_path = None
                return
            with LoraFile(lora_path) as lora:
                self._check_lora(lora)
                self.engine.set_lora_inputs(lora.padded(self.engine.lora_rank))
            self.lora_path = Path(lora_path)

    def lora_fits(self, lora: LoraFile) -> bool:
        """True when the graph's LoRA inputs can hold this adapter."""
        rank = self.engine.lora_rank
        return (
            bool(rank)
            and lora.info.stored_rank <= rank
            and (set(lora.targets) <= set(self.engine.lora_targets))
        )

    def _check_lora(self, lora: LoraFile) -> None:
        lora.check_base(self.base_identity, self.model_type, self.graph_path)
        if not self.lora_fits(lora):
            have = (
                f"rank {self.engine.lora_rank} on {', '.join(self.engine.lora_targets)}"
                if self.engine.lora_rank
                else "no LoRA inputs"
            )
            raise LlmToolError(
                f"LoRA {lora.path.name} needs a graph taking rank {lora.info.stored_rank} "
                f"adapters on {', '.join(lora.targets)}; this graph has {have} (export it with "
                "--lora-rank and --lora-targets, or run the .bin model)",
                self.graph_path,
            )

    def close(self) -> None:
        """Stop background generations, then release the engine now (also done when the
        session is collected, or on leaving a `with` block). Later calls raise LlmToolError."""
        self._stop_workers()
        with self._lock:
            if not self._closed:
                self._closed = True
                self.engine.close()

    def _stop_workers(self) -> None:
        self._cancel.set()
        for thread in list(self._workers):
            if thread is not threading.current_thread():
                thread.join()
        self._cancel.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise LlmToolError("this LlmInference is closed")

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the reference API --------------------------------------------------------------------

    def generate_response(
        self, prompt: Prompt, chat: bool = False, system: str | None = None
    ) -> str:
        """The reply to `prompt`. With `chat` (implied by a list of {"role", "content"}
        messages) the model's own chat template frames it, after an optional system prompt."""
        return self.generate(prompt, chat=chat, system=system).text

    def generate_response_async(
        self, prompt: Prompt, chat: bool = False, system: str | None = None
    ) -> Future[str]:
        """Generate in a background thread, streaming to options.result_listener.

        The thread is joined by close() and at interpreter exit, where an unfinished generation
        is cancelled (its future then holds the text so far, stop reason "cancelled").
        """
        prompt = clean_prompt(prompt)
        self._check_open()
        future: Future[str] = Future()

        def work() -> None:
            try:
                listener = self.options.result_listener
                result = self.generate(prompt, listener=listener, chat=chat, system=system)
                future.set_result(result.text)
            except Exception as exc:  # reported to the listener, not raised in the thread
                if self.options.error_listener is not None:
                    self.options.error_listener(exc)
                future.set_exception(exc)
            finally:
                self._workers.discard(threading.current_thread())

        thread = threading.Thread(target=work, name="llmtool-generate")
        self._workers.add(thread)
        _live_sessions.add(self)
        thread.start()
        return future

    def size_in_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(clean_text(text, "the text")))

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits at every position: shape (len(token_ids), vocab)."""
        ids = self.check_token_ids(token_ids)
        if len(ids) > self.engine.max_seq_len:
            raise LlmToolError(
                f"{len(ids)} tokens exceed the graph's KV cache of {self.engine.max_seq_len}"
            )
        with self._lock:
            self._check_open()
            self.engine.reset()
            return self.engine.prefill(ids, all_logits=True)

    def check_token_ids(self, token_ids: object) -> list[int]:
        """token_ids as a list of ints, each a row of the model's vocabulary, else LlmToolError."""
        if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
            raise LlmToolError(f"token ids must be a list of ints (got {_kind(token_ids)})")
        ids = list(token_ids)  # type: ignore[call-overload]
        if not ids:
            raise LlmToolError("logits() needs at least one token id")
        vocab = self.engine.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, Integral):
                raise LlmToolError(f"token ids must be ints (got {_kind(i)})")
            if not 0 <= i < vocab:
                raise LlmToolError(
                    f"token id {int(i)} is outside the model's vocabulary (0 to {vocab - 1})"
                )
        return [int(i) for i in ids]

    # -- generation -----------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation through the model's chat template, exactly as
        transformers' apply_chat_template(..., add_generation_prompt=True) gives them."""
        template = self.tokenizer.chat_template
        if template is None:
            raise LlmToolError(
                "this model has no chat template (tokenizer_config.json chat_template)",
                self.options.model_path,
            )
        text = template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def chat_stop_ids(self) -> set[int]:
        """The end-of-turn token the template closes a reply with, if it is one token."""
        template = self.tokenizer.chat_template
        marker = template.end_of_turn() if template is not None else None
        if not marker:
            return set()
        ids = self.tokenizer.encode(marker, add_bos=False, add_eos=False)
        return {ids[0]} if len(ids) == 1 else set()

    def prompt_ids(
        self, prompt: Prompt, chat: bool = False, system: str | None = None
    ) -> tuple[list[int], int]:
        """Prompt token ids cut to the context window, and how many were dropped (a chat is
        never cut, its template would lose its head: it may fill max tokens unless a context
        window is set)."""
        chat = chat or not isinstance(prompt, str)
        if chat:
            ids = self.chat_ids(chat_messages(prompt, system))
        elif system is not None:
            raise LlmToolError("a system prompt needs chat mode")
        else:
            ids = self.tokenizer.encode(prompt)
        return self.fit_prompt(ids, whole=chat)

    def fit_prompt(self, ids: list[int], whole: bool = False) -> tuple[list[int], int]:
        """Prompt ids cut to the context window (unless `whole`: a templated prompt), and how
        many were dropped."""
        o = self.options
        max_tokens = self.max_tokens
        if not ids:
            raise LlmToolError("the prompt is empty")
        if len(ids) >= max_tokens:
            raise LlmToolError(
                f"the prompt has {len(ids)} tokens, more than max tokens {max_tokens} allows "
                "(input + output)"
            )
        window = o.context_window or max(1, max_tokens // 2)
        if whole:
            # Never cut (the template's head would go): only an explicit window limits it.
            if o.context_window is not None and len(ids) > window:
                raise LlmToolError(
                    f"the chat prompt has {len(ids)} tokens, more than the context window "
                    f"{window} keeps"
                )
            return ids, 0
        dropped = max(0, len(ids) - window)
        if dropped:
            keep_bos = ids[0] == self.tokenizer.bos_id and self.tokenizer.add_bos
            head = ids[:1] if keep_bos else []
            ids = head + ids[len(ids) - window + len(head) :]
        return ids, dropped

    def generate(
        self,
        prompt: Prompt,
        listener: ResultListener | None = None,
        chat: bool = False,
        system: str | None = None,
    ) -> GenerationResult:
        o = self.options
        prompt = clean_prompt(prompt)
        if system is not None:
            system = clean_text(system, "the system prompt")
        if listener is not None and not callable(listener):
            raise LlmToolError(f"the listener must be a function (got {_kind(listener)})")
        self._check_open()
        texts = [prompt] if isinstance(prompt, str) else [m.get("content", "") for m in prompt]
        for text in [*texts, system or ""]:
            refused = self.safety.find(str(text))
            if refused:
                raise LlmToolError(
                    f"the prompt was refused by the safety filter (contains {refused.group(0)!r})"
                )
        chat = chat or not isinstance(prompt, str)
        ids, dropped = self.prompt_ids(prompt, chat, system)
        sampler = Sampler(o.top_k, o.temperature, o.random_seed)
        stops = set(self.tokenizer.stop_ids) | (self.chat_stop_ids() if chat else set())
        out: list[int] = []
        text = ""
        reason = "max_tokens"
        with self._lock:
            self._check_open()
            self.engine.reset()
            t0 = time.perf_counter()
            logits = self.engine.prefill(ids)
            t1 = time.perf_counter()
            stream = self.tokenizer.stream_decoder()
            while len(ids) + len(out) < self.max_tokens:
                token = sampler(logits)
                if token in stops:
                    reason = "stop_token"
                    break
                out.append(token)
                piece = stream.push(token)
                hit = self.safety.find(text + piece) if piece else None
                if hit:
                    text, reason = text[: max(hit.start(), 0)], "safety_filter"
                    break
                if piece:
                    text += piece
                    if listener:
                        listener(piece, False)
                if len(ids) + len(out) >= self.max_tokens:
                    break
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                logits = self.engine.decode(token)
            t2 = time.perf_counter()
        if reason != "safety_filter":
            tail = stream.flush()
            if tail:
                text += tail
                if listener:
                    listener(tail, False)
        if listener:
            listener("", True)
        return GenerationResult(text, ids, out, reason, dropped, t1 - t0, t2 - t1)
