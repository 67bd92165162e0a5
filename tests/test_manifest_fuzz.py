"""Property-based: a mutated manifest (fields dropped, added, retyped, revalued, random JSON or
bytes) is either refused with a one-line `BundleError` or loads cleanly; nothing else escapes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adainfer.errors import BundleError
from adainfer.manifest import Manifest
from adainfer.runtime.bundle import open_bundle

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.just("a\nb"),
                         st.sampled_from(["", "..", "../x", "/etc/passwd", "block_00.onnx", "manifest.json",
                                          "float16", "left", "a" * 64, "0" * 64]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def valid(stories_bundle) -> dict:
    return json.loads((stories_bundle / "manifest.json").read_text())


def _paths(value, prefix=()):
    """Every path (tuple of keys / indexes) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _get(value, path):
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated(draw, valid: dict):
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["drop", "add", "replace", "nudge", "retype"]))
        if not path:
            if kind in ("replace", "retype"):
                data = draw(json_values)
            continue
        parent, key = _get(data, path[:-1]), path[-1]
        old = parent[key]
        if kind == "drop":
            del parent[key]
        elif kind == "add":
            target = old if isinstance(old, (dict, list)) else parent
            if isinstance(target, dict):
                target[draw(st.text(max_size=10))] = draw(json_values)
            else:
                target.append(draw(json_values))
        elif kind == "replace":
            parent[key] = draw(json_values)
        elif kind == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = old + draw(st.sampled_from([-1, 1, -old, 2**31, 2**53, 2**60, 0.5]))
        elif kind == "retype":
            parent[key] = draw(st.sampled_from([str(old), [old], {"value": old}, None, True, 1.5]))
        if not isinstance(data, (dict, list)):
            break
    return data


def _clean(callable_):
    """Run a load; True when it loaded, False when it was refused cleanly; anything else fails."""
    try:
        callable_()
    except BundleError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return False
    return True


def test_mutated_manifests_are_refused_or_load(valid, stories_bundle, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(stories_bundle, bundle)
    outcomes = []

    @SETTINGS
    @given(data=st.data())
    def check(data):
        manifest = data.draw(mutated(valid))
        outcomes.append(_clean(lambda: Manifest.from_dict(manifest)))
        text = json.dumps(manifest)  # NaN / Infinity written as such: the reader must refuse them
        (bundle / "manifest.json").write_text(text)
        loaded = _clean(lambda: open_bundle(bundle, check_digests=False))
        assert not loaded or outcomes[-1]  # what the files check accepts, the schema accepted

    check()
    assert False in outcomes  # the mutations do reach the validation
    assert _clean(lambda: Manifest.from_dict(valid))


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     st.text(max_size=200).map(str.encode)))
def test_random_bytes_as_manifest(raw, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("raw")
    (bundle / "manifest.json").write_bytes(raw)
    with pytest.raises(BundleError):  # nothing random is a valid manifest (its graphs are missing)
        Manifest.load(bundle)


def test_valid_manifest_round_trips(valid, stories_bundle):
    manifest = Manifest.from_dict(valid)
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert manifest.digest() == Manifest.load(stories_bundle).digest()
