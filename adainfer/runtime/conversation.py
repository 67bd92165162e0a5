"""Chat: render the bundle's chat template as transformers does, generate, stop at the end of the turn.

The template is the model's own Jinja source (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`), rendered in jinja2's immutable sandbox with the settings and
helpers of transformers' `apply_chat_template` (`trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `tojson`, `strftime_now`; the special tokens
`bos_token`, `eos_token`, ... as variables) and tokenized without adding special tokens
again. Generation stops at the bundle's end-of-sequence ids and at the tokenizer config's
`eos_token` (the end of an assistant turn, e.g. ChatML's `<|im_end|>`).

    >>> import adainfer.runtime as rt
    >>> model = rt.load(bundle)
    >>> rt.chat(model, "What is the capital of France?").text      # the assistant's reply only
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Optional, Sequence, Union

from ..errors import BundleError, InputError

#: the tokenizer attributes transformers passes to a chat template as variables
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Messages = Union[str, Sequence[dict]]


@dataclass(frozen=True)
class ChatTemplate:
    """A bundle's chat template with the special-token strings it may refer to."""

    source: str
    special_tokens: dict[str, str]

    @property
    def end_of_turn(self) -> Optional[str]:
        return self.special_tokens.get("eos_token")

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (a question, or a list of {"role", "content"} dicts)."""
        import jinja2

        try:
            return _compile(self.source).render(messages=_messages(messages), tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:  # includes the template's own raise_exception(...)
            raise InputError(f"chat template: {exc}") from None


def _compile(source: str):
    """The template compiled as transformers' `_compile_jinja_template` compiles it."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BundleError(f"the bundle's chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None


def _messages(messages: Messages) -> list[dict]:
    if isinstance(messages, str):
        if not messages.strip():
            raise InputError("empty chat message")
        return [{"role": "user", "content": messages}]
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InputError(f"chat message {i} must be a dict with 'role' and 'content'")
        out.append({k: v for k, v in message.items() if v is not None})  # as transformers drops None fields
    if not out:
        raise InputError("no chat messages")
    return out


def load_template(bundle) -> Optional[ChatTemplate]:
    """The bundle's chat template, or None when it has none."""
    files = bundle.manifest.files
    config = {}
    if "tokenizer_config" in files:
        config = _read_json(bundle.path(files["tokenizer_config"].file))
    tokens = {}
    if "special_tokens_map" in files:
        tokens.update(_token_strings(_read_json(bundle.path(files["special_tokens_map"].file))))
    tokens.update(_token_strings(config))
    if "chat_template" in files:
        source = _read_text(bundle.path(files["chat_template"].file))
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: transformers uses "default"
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    return ChatTemplate(source=source, special_tokens=tokens)


def _read_text(path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not readable UTF-8 text ({exc})") from None


def _read_json(path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_strings(config: dict) -> dict[str, str]:
    """Special tokens as strings (a tokenizer config may store them as AddedToken dicts)."""
    out = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def template_of(model) -> ChatTemplate:
    """The model's chat template; a bundle without one is refused."""
    template = load_template(model.bundle)
    if template is None:
        raise InputError(f"bundle {model.bundle.root} has no chat template (chat_template.jinja or "
                         f"tokenizer_config.json's chat_template); use a plain prompt")
    if model.tokenizer is None:
        raise BundleError("this bundle has no tokenizer.json; chat needs one")
    return template


def prompt_ids(model, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat prompt (special tokens come from the template, none are added)."""
    text = template_of(model).render(messages, add_generation_prompt)
    return model.tokenizer.encode(text, add_special_tokens=False)


def stop_ids(model) -> set[int]:
    """The bundle's end-of-sequence ids and the template's end-of-turn token."""
    ids = set(model.manifest.eos_token_ids)
    end = template_of(model).end_of_turn
    token = model.tokenizer.token_id(end) if end else None
    if token is not None:
        ids.add(token)
    return ids


def stream(model, messages: Messages, max_new_tokens: int = 256, **options) -> Iterator:
    """Yield the reply's tokens (`Model.stream`'s events) up to and including the end-of-turn token."""
    yield from _reply(model, prompt_ids(model, messages), max_new_tokens, options)


def _reply(model, ids: list[int], max_new_tokens: int, options: dict) -> Iterator:
    stops = stop_ids(model) if options.get("stop_at_eos", True) else set()
    for event in model.stream(ids, max_new_tokens, **options):
        yield event
        if event.token in stops:
            return


def chat(model, messages: Messages, max_new_tokens: int = 256, **options):
    """Answer `messages` (a question, or a list of {"role", "content"} dicts); returns a `Generation`
    whose `text` is the assistant's reply alone and `tokens` the reply's ids (end-of-turn included).
    `options` are `Model.stream`'s (temperature, top_p, seed, mode, ...)."""
    from .model import Generation

    started = time.perf_counter()
    ids = prompt_ids(model, messages)
    stats: dict = {}
    events = list(_reply(model, ids, max_new_tokens, {**options, "stats": stats}))
    tokens = [e.token for e in events]
    count = max(1, len(tokens))
    stopped = bool(tokens) and options.get("stop_at_eos", True) and tokens[-1] in stop_ids(model)
    return Generation(text=model.tokenizer.decode(tokens), tokens=tokens, prompt_tokens=len(ids), new_tokens=len(tokens),
                      layers_per_token=[e.layers for e in events], seconds=time.perf_counter() - started,
                      stop_reason="eos" if stopped else "max_new_tokens", mode=options.get("mode", "full"),
                      macs_per_token=stats.get("macs", 0.0) / count,
                      decision_macs_per_token=stats.get("decision_macs", 0.0) / count,
                      acceptance_rate=stats.get("acceptance_rate"), rejected_rounds=stats.get("rejected_rounds"))
