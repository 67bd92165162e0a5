"""Which sessions let their threads spin-wait: by default every session, each pool but the full step's told
to stop spinning when its run returns (so sessions run one after another do not spin against each other);
`spinning=False` / `--spin off` none."""

from __future__ import annotations

import pytest

import adainfer.runtime as rt
from conftest import run_cli

PROMPT = "Once upon a time"


def config(session, key: str) -> str:
    return session.get_session_options().get_session_config_entry(key)


@pytest.mark.parametrize("option, expected", [({}, "1"), ({"spinning": True}, "1"), ({"spinning": False}, "0")])
def test_the_sessions_are_made_with_that_choice(stories_bundle, option, expected):
    model = rt.load(stories_bundle, **option)
    model.generate(PROMPT, max_new_tokens=2)
    for graph in ("full_step", "embed", "block_00"):
        session = model.sessions[graph]  # the last two made on first use
        assert config(session, "session.intra_op.allow_spinning") == expected, graph
        # a spinning pool stops when its run returns, except the full step's (full-depth tokens run back to back)
        stops = expected if graph != "full_step" else "0"
        assert config(session, "session.force_spinning_stop") == stops, graph


def test_the_iobinding_cpu_backend_spins_as_the_cpu_backend_does(stories_bundle):
    model = rt.load(stories_bundle, backend="cpu-iobinding")
    model.generate(PROMPT, max_new_tokens=2)
    for graph in ("embed", "final_head"):
        assert config(model.sessions[graph], "session.intra_op.allow_spinning") == "1", graph
        assert config(model.sessions[graph], "session.force_spinning_stop") == "1", graph


def test_spin_option_of_adainfer_run(stories_bundle):
    outputs = {}
    for spin in (None, "off", "on"):
        rc, out, err = run_cli("adainfer", "run", str(stories_bundle), PROMPT, "--max-new-tokens", "12",
                               *(("--spin", spin) if spin else ()))
        assert rc == 0, err
        outputs[spin] = out
    assert outputs[None] == outputs["off"] == outputs["on"] and len(outputs[None]) > len(PROMPT)
    rc, out, err = run_cli("adainfer", "run", str(stories_bundle), PROMPT, "--backend", "cpu-iobinding", "--spin", "on")
    assert rc == 2 and err.strip().count("\n") == 0 and "--spin applies to the cpu backend only" in err
