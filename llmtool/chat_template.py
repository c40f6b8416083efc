"""Chat templates: a model's own Jinja template (tokenizer_config.json `chat_template`, or
`chat_template.jinja`) rendered the way transformers' `apply_chat_template` renders it.

The rendered text is tokenized without adding BOS/EOS (the template writes them itself), so
`encode(render(messages), add_bos=False)` gives the ids transformers gives. For bundles, the
reference runtimes want the template as fixed text around each user turn: `prompt_affixes`
derives that prefix/suffix (and a session prefix for a system prompt) from the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llmtool.errors import LlmToolError

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")
_PROBE = "\x00llmtool-probe\x00"  # stands for a turn's content when splitting a rendering
_REPLY = "\x00llmtool-reply\x00"


@dataclass(frozen=True)
class PromptAffixes:
    """A chat template as the reference bundles' PromptTemplate: text around a user turn."""

    prompt_prefix: str
    prompt_suffix: str
    session_prefix: str = ""  # the system prompt's turn, once per session

    def llm_parameters(self) -> dict[str, Any]:
        """The `prompt_template` entry of a bundle's LlmParameters (formats/llm_params.py)."""
        return {
            "prompt_template": {
                "session_prefix": self.session_prefix,
                "prompt_prefix": self.prompt_prefix,
                "prompt_suffix": self.prompt_suffix,
            }
        }


def template_source(config: dict[str, Any], files: dict[str, bytes]) -> tuple[str | None, str]:
    """The template text and the file it is in: chat_template.jinja wins over
    tokenizer_config.json, as in transformers; of a list of named templates, "default"."""
    if TEMPLATE_FILE in files:
        try:
            return files[TEMPLATE_FILE].decode("utf-8"), TEMPLATE_FILE
        except UnicodeDecodeError as err:
            raise LlmToolError(f"not UTF-8 text ({err})", path=TEMPLATE_FILE) from None
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    text = value if isinstance(value, str) and value.strip() else None
    return text, "tokenizer_config.json"


class ChatTemplate:
    """One compiled template plus the special tokens it may refer to (bos_token, ...)."""

    def __init__(
        self,
        source: str,
        special_tokens: dict[str, str | None] | None = None,
        origin: str | None = None,  # the file it came from, for error messages
    ):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_tag()]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise LlmToolError(f"invalid chat template ({err})", path=origin) from None
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as the model saw it in training, ready for the model's turn."""
        from jinja2 import TemplateError

        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise LlmToolError("a chat message must be a dict with 'role' and 'content' text")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except LlmToolError:
            raise
        except TemplateError as err:
            raise LlmToolError(f"the chat template failed: {err}") from None

    def prompt_affixes(self, system: str | None = None) -> PromptAffixes:
        """The template as fixed text: what opens a user turn, what follows the user's text
        (closing it and opening the model's turn), and what starts a session (a default or
        the given `system` turn).

        A leading BOS the template writes is left out: the runtimes add BOS themselves.
        Templates that fold the system prompt into the first user turn (Gemma) have no
        separate session prefix: asking for one is an error."""
        first = self._split([{"role": "user", "content": _PROBE}])
        before, suffix = first
        # A later user turn shows the opener alone: after a model turn's closing marker.
        later = self._split(
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": _REPLY},
                {"role": "user", "content": _PROBE},
            ]
        )[0]
        between = later.split(_REPLY)[-1]  # closes the model's turn, opens the user's
        marker = self.end_of_turn()
        if marker and between.startswith(marker):
            opener = between[len(marker) :].lstrip("\n")
        else:
            opener = _common_suffix(before, between)
        if not opener or not before.endswith(opener):
            raise LlmToolError("cannot find where the chat template opens a user turn")
        session = self._strip_bos(before[: len(before) - len(opener)])
        if system is not None:
            head = self._strip_bos(
                self._split(
                    [{"role": "system", "content": system}, {"role": "user", "content": _PROBE}]
                )[0]
            )
            if not head.endswith(opener) or system not in head:
                raise LlmToolError(
                    "this chat template merges the system prompt into the user's turn; "
                    "it has no separate system prefix"
                )
            session = head[: len(head) - len(opener)]
        return PromptAffixes(opener, suffix, session)

    def _split(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        text = self.render(messages, add_generation_prompt=True)
        if text.count(_PROBE) != 1:
            raise LlmToolError("the chat template does not show the user's text once")
        before, after = text.split(_PROBE)
        return before, after

    def _strip_bos(self, text: str) -> str:
        bos = self.special_tokens.get("bos_token")
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def role_affixes(self) -> dict[str, tuple[str, str]]:
        """Per role, the text before and after a turn's content, as LiteRT-LM's
        `prompt_templates` (user, model, system) want it: the runtime frames each message
        with its role's pair. No "system" entry when the template has no turn of its own for
        a system prompt (Gemma folds it into the user's turn, or refuses it)."""
        affixes = self.prompt_affixes()
        model_close = self._model_close()
        suffix = affixes.prompt_suffix
        if model_close and suffix.startswith(model_close):
            user_close, model_open = model_close, suffix[len(model_close) :]
        else:
            user_close, model_open = suffix, ""
        roles = {
            "user": (affixes.prompt_prefix, user_close),
            "model": (model_open, model_close or ""),
        }
        try:
            before, after = self._split(
                [{"role": "system", "content": _PROBE}, {"role": "user", "content": _REPLY}]
            )
        except LlmToolError:
            return roles
        between = after.split(_REPLY)[0] if _REPLY in after else ""
        if between.endswith(affixes.prompt_prefix) and _REPLY in after:
            roles["system"] = (
                self._strip_bos(before),
                between[: len(between) - len(affixes.prompt_prefix)],
            )
        return roles

    def _model_close(self) -> str | None:
        """Everything the template writes after a model turn's content."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except LlmToolError:
            return None
        return text.split(_PROBE)[1] if text.count(_PROBE) == 1 else None

    def end_of_turn(self) -> str | None:
        """The text that closes a model turn (e.g. "<end_of_turn>"), up to its first line
        break: where generation of a reply should stop."""
        after = self._model_close()
        return (after.split("\n")[0].strip() or None) if after else None


def chat_messages(
    prompt: str | list[dict[str, Any]], system: str | None = None
) -> list[dict[str, Any]]:
    """A message list from a prompt (one user turn, after an optional system turn) or as
    given; roles are checked."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return messages
    if system is not None:
        raise LlmToolError("give the system prompt as the first message of the list")
    messages = [dict(m) for m in prompt]
    if not messages:
        raise LlmToolError("the chat has no messages")
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LlmToolError(
                f"a chat message needs a role ({', '.join(ROLES)}) and text content: {m!r}"
            )
    return messages


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def _generation_tag() -> type:
    """`{% generation %}...{% endgeneration %}` (marks the assistant's tokens for training in
    transformers): renders its body unchanged."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return Generation


def _raise(message: str) -> None:
    raise LlmToolError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # transformers' tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)
