"""Property-based fuzzing of the pipeline loader and the --set parser (issue 16): any document
and any override gives a valid config or an EdgekdError (one line), never another exception,
within a time and memory bound."""

from __future__ import annotations

import copy
import time
import tracemalloc

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edgekd.stages  # noqa: E402,F401  (imported up front: the bound is on loading, not on importing torch)
from edgekd.config import apply_override, load_pipeline, validate  # noqa: E402
from edgekd.errors import EdgekdError  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
SECONDS, BYTES = 5.0, 64 << 20  # per document

YAML_CHARS = st.sampled_from(list("abcdefghijklmnop01234567890 \n\t:-,[]{}&*!|>'\"#%@`?$~._=/\\")
                             + ["${EDGEKD_FUZZ_UNSET}", "${HOME:-x}", "<<: ", "&a ", "*a", "---\n", "stages:\n", "- ",
                                "data:\n  source: ", "name: ", "distill:", "epochs: ", "1e400", "-.inf", ".nan", "\x00",
                                "\u2028", "é"])
yaml_text = st.lists(YAML_CHARS, max_size=120).map("".join)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30))
trees = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                     max_leaves=25)


def _bounded(fn) -> None:
    """fn() returns or raises EdgekdError; anything else fails the property, as does time or memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except EdgekdError as e:
        assert "\n" not in str(e) and str(e), repr(e)
    finally:
        seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert seconds < SECONDS and peak < BYTES, (seconds, peak)


@FUZZ
@given(text=yaml_text)
def test_any_yaml_text_loads_or_fails_with_an_edgekd_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _bounded(lambda: load_pipeline(path))


@FUZZ
@given(tree=trees)
def test_any_parsed_tree_validates_or_fails_with_an_edgekd_error(tree):
    _bounded(lambda: validate(tree))


@FUZZ
@given(key=st.sampled_from(["name", "seed", "data", "data.source", "data.image_size", "student.arch", "teacher",
                            "stages", "stages[0]", "stages[0].distill", "distill.epochs", "distill.loss",
                            "data.archive.max_files", "student.trust_pickle", "stages[7].x", "a..b", "[0]", "",
                            "data[0]", "stages[0].distill.lr.x"]) | st.text(max_size=20),
       value=yaml_text)
def test_any_override_applies_or_fails_with_an_edgekd_error(tmp_path, image_folder, key, value):
    base = {"name": "fuzz", "data": {"source": str(image_folder)},
            "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25},
            "stages": [{"distill": {"epochs": 1, "loss": "ce"}}]}

    def run():
        raw = copy.deepcopy(base)
        apply_override(raw, f"{key}={value}")
        validate(raw)

    _bounded(run)


@FUZZ
@given(tree=trees, where=st.sampled_from(["data", "student", "stages", "name", "seed"]))
def test_a_valid_pipeline_with_any_subtree_replaced_loads_or_fails_cleanly(tmp_path, image_folder, tree, where):
    doc = {"name": "fuzz", "data": {"source": str(image_folder)},
           "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25},
           "stages": [{"distill": {"epochs": 1, "loss": "ce"}}]}
    doc[where] = tree
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    except yaml.YAMLError:
        return
    _bounded(lambda: load_pipeline(path))
