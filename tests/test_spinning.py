"""Which sessions let their threads spin-wait: by default the full step's only (the one session a full-depth
token runs), never two sessions that run one after another; `--spin` overrides it from the command line."""

from __future__ import annotations

import pytest

import adainfer.runtime as rt
from adainfer.runtime.backends.cpu import spins
from conftest import run_cli

PROMPT = "Once upon a time"


def spinning(session) -> str:
    return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_only_the_full_steps_session_spins_by_default():
    assert spins("full_step", None, "full_step") and not spins("embed", None, "full_step")
    assert not spins("full_step", None, None)  # a backend that does not run the full step: nothing spins
    assert spins("embed", True, "full_step") and not spins("full_step", False, "full_step")


@pytest.mark.parametrize("option, full, others", [(None, "1", "0"), (True, "1", "1"), (False, "0", "0")])
def test_the_sessions_are_made_with_that_choice(stories_bundle, option, full, others):
    model = rt.load(stories_bundle, spinning=option)
    model.generate(PROMPT, max_new_tokens=2)
    assert spinning(model.sessions["full_step"]) == full
    assert spinning(model.sessions["embed"]) == spinning(model.sessions["block_00"]) == others  # made on first use


def test_spin_option_of_adainfer_run(stories_bundle):
    outputs = {}
    for spin in ("auto", "off", "on"):
        rc, out, err = run_cli("adainfer", "run", str(stories_bundle), PROMPT, "--max-new-tokens", "12", "--spin", spin)
        assert rc == 0, err
        outputs[spin] = out
    assert outputs["auto"] == outputs["off"] == outputs["on"] and len(outputs["auto"]) > len(PROMPT)
    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), PROMPT, "--backend", "cpu-iobinding", "--spin", "on")
    assert rc == 2 and err.strip().count("\n") == 0 and "--spin applies to the cpu backend only" in err
