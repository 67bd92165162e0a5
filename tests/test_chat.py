"""Chat templates rendered without transformers, exactly as transformers renders them; a bundle without
a template refuses `--chat` in one line."""

from __future__ import annotations

import pytest

from adainfer.errors import InputError
from adainfer.runtime.conversation import ChatTemplate

#: uses what transformers offers a template: bos/eos variables, tojson, loop controls, raise_exception
#: (indented block tags and newlines after them: trim_blocks and lstrip_blocks both change the text)
TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
  <{{ m['role'] }}>{{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"""
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
MESSAGES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief & <kind>"}, {"role": "user", "content": 'quote " and ünïcödé'}],
    [{"role": "user", "content": str(i)} for i in range(5)],
]


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(messages, generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    expected, _ = render_jinja_template([messages], chat_template=TEMPLATE, add_generation_prompt=generation_prompt,
                                        **TOKENS)
    assert ChatTemplate(TEMPLATE, TOKENS).render(messages, generation_prompt) == expected[0]


def test_template_raise_exception_is_an_input_error():
    with pytest.raises(InputError, match="chat template: no tools here"):
        ChatTemplate(TEMPLATE, TOKENS).render([{"role": "tool", "content": "x"}])


def test_template_runs_in_the_immutable_sandbox():
    with pytest.raises(InputError, match="chat template: access to attribute 'append' of 'list' object is unsafe"):
        ChatTemplate("{{ messages.append(1) }}", {}).render("hi")


def test_run_chat_without_a_template_is_refused(stories_bundle):
    from conftest import run_cli

    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), "--chat", "Hello")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err == (f"adainfer: error: bundle {stories_bundle} has no chat template (chat_template.jinja or "
                   "tokenizer_config.json's chat_template); use a plain prompt\n")


def test_run_chat_argument_errors(stories_bundle):
    from conftest import run_cli

    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), "a prompt", "--chat", "Hello")
    assert rc == 2 and err == "adainfer: error: expected [BUNDLE] --chat QUESTION (a prompt and --chat cannot be combined)\n"
    rc, out, err = run_cli("adainfer", "run")
    assert rc == 2 and err == "adainfer: error: expected [BUNDLE] PROMPT or [BUNDLE] --chat QUESTION\n"


def _bundle_with_template(stories_bundle, tmp_path, data: bytes):
    import dataclasses
    import shutil

    from adainfer.manifest import Manifest, file_spec

    bundle = tmp_path / "bundle"
    shutil.copytree(stories_bundle, bundle)
    (bundle / "chat_template.jinja").write_bytes(data)
    manifest = Manifest.load(bundle)
    manifest = dataclasses.replace(manifest, files={**manifest.files, "chat_template": file_spec(bundle, "chat_template.jinja")})
    manifest.save(bundle)
    return bundle


@pytest.mark.parametrize("data, needle", [
    (b"{% for m in messages %}", "the bundle's chat template is not valid Jinja (line 1: "),
    (b"\xff\xfe{{ x }}", "chat_template.jinja: not readable UTF-8 text"),
    (b"{{ raise_exception('only system messages, please') }}", "chat template: only system messages, please"),
])
def test_bad_templates_are_one_line_errors(stories_bundle, tmp_path, data, needle):
    from conftest import run_cli

    bundle = _bundle_with_template(stories_bundle, tmp_path, data)
    rc, out, err = run_cli("adainfer", "run", str(bundle), "--chat", "Hello")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("adainfer: error: ") and needle in err, err


def test_chat_on_a_bundle_with_a_template(stories_bundle, tmp_path):
    """The prompt is the rendered template, tokenized without the tokenizer's own BOS; `text` is the reply alone."""
    import adainfer.runtime as rt

    bundle = _bundle_with_template(stories_bundle, tmp_path, b"{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:")
    model = rt.load(bundle)
    reply = rt.chat(model, "Once upon a time", max_new_tokens=12)
    prompt = model.tokenizer.encode("<s>Q: Once upon a time\nA:", add_special_tokens=False)
    assert prompt[0] == 1 and prompt[1] != 1  # the template's BOS, not a second one
    expected = model.generate(prompt, max_new_tokens=12).tokens
    assert reply.tokens == expected and reply.prompt_tokens == len(prompt)
    assert reply.text == model.tokenizer.decode(expected)
