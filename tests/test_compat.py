"""Compatibility matrix: every timm family and 20 HF vision models through convert / train / merge.

Default run: a fast subset (timm's own ``test_*`` models, a few real families that cover the known pitfalls,
four HF models). ``pytest -m compat tests/test_compat.py``: the full matrix, one representative per timm
architecture family (derived from timm's registry) and all 20 HF models; it regenerates
``docs/compatibility.md``.

Per model (see :func:`zoo.check`): convert with ``every=2``; forward and backward in train mode; every
replaced block's ``a`` and ``b`` get gradients; eval forward; merge equals converted. A model that cannot be
converted must raise a typed ``ReplaceWrapError`` with a reason, never crash.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest

import zoo
import zoo_hf

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"

# The fast subset: real families chosen to cover the pitfalls that discovery and fusion must handle, each
# pinned to its smallest variant (finding that variant means building every model of the family on the
# meta device: fine for the full matrix, too slow for the default run on a fresh machine).
FAST_FAMILIES = {
    "vision_transformer:vit": ("vit_tiny_patch16_224", "plain ViT stack"),
    "swin_transformer:swin": ("swin_tiny_patch4_window7_224", "shifted windows alternate; widths change"),
    "convnext:convnext": ("convnext_zepto_rms", "stages of blocks with a downsample per stage"),
    "efficientnet:efficientnet": ("efficientnet_lite0", "width, kernel and expansion change at stage starts"),
    "resnet:resnet": ("resnet10t", "one block per stage, chained across stages by shape adaptation"),
    "regnet:regnetx": ("regnetx_002", "blocks are plain attributes (s1.b1, s1.b2, ...)"),
    "xception:legacy": ("legacy_xception", "blocks are plain attributes of the model itself"),
    "densenet:densenet": ("densenet121", "dense layers: the input width grows layer by layer"),
    "repvit:repvit": ("repvit_m1", "period-2 alternation (SE / no SE)"),
    "gcvit:gcvit": ("gcvit_xxtiny", "period-2 alternation (global / local attention)"),
    "byobnet:repvgg": ("repvgg_a0", "parallel 3x3 / 1x1 branches are not a stack"),
    "levit:levit": ("levit_128s", "attention with downsampling stages"),
    "coat:coat": ("coat_tiny", "a submodule shared by sibling blocks"),
    "mobilevit:mobilevit": ("mobilevit_xxs", "hybrid: inverted residuals and transformer layers"),
    "maxxvit:coatnet": ("coatnet_pico_rw_224", "hybrid conv + attention stages"),
    "hiera:hiera": ("hiera_tiny_224", "does not trace: structural route"),
}
FAST_HF = ["ViT", "Swin", "RegNet", "Hiera"]

# Families left out of the full matrix, with the reason (timm-style). See zoo.TIMM_EXCLUDE.
EXCLUDE = zoo.TIMM_EXCLUDE

_FAMILIES = zoo.timm_families()
_ROWS: dict[str, zoo.Row] = {}
_START = time.perf_counter()


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()  # large models one after another: give their memory back before the next


def _record(row: zoo.Row) -> zoo.Row:
    _ROWS[row.family or row.model] = row
    return row


def _run_timm(family: str, name: str | None = None) -> zoo.Row:
    name = name or zoo.representative(_FAMILIES[family])
    try:
        row = zoo.check_timm(name, family)
    except Exception as exc:  # recorded, then re-raised: a crash fails the matrix
        _record(zoo.Row(model=name, family=family, status="crash", reason=f"{type(exc).__name__}: {exc}"))
        raise
    return _record(row)


def _run_hf(name: str) -> zoo.Row:
    try:
        row = zoo.check_hf(name)
    except Exception as exc:
        _record(zoo.Row(model=name, family=f"hf:{name}", status="crash", reason=f"{type(exc).__name__}: {exc}"))
        raise
    return _record(row)


# --- default run: the fast subset ------------------------------------------------------------------------


def _converted_or_too_shallow(row: zoo.Row) -> None:
    """Converted, or refused with the typed error because no stack has 3 blocks (which must be true)."""
    if row.status == "ok":
        assert row.replaced >= 1 and row.ratio < 1.0 and row.merge_err <= zoo.MERGE_RTOL
        return
    assert row.status == "not converted" and row.reason.startswith("NothingToReplaceError"), row.reason
    assert all(n < 3 for n in row.stacks), (row.stacks, row.reason)
    assert ("shorter than 3 blocks" in row.reason) if row.stacks else ("no stack of repeated blocks" in row.reason)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", zoo.timm_test_models())
def test_timm_test_model(name):
    """timm's tiny test models: some are too shallow (one block of each kind) and must say so."""
    _converted_or_too_shallow(zoo.check_timm(name))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", sorted(FAST_FAMILIES))
def test_timm_family_fast(family):
    row = _run_timm(family, FAST_FAMILIES[family][0])
    assert row.status == "ok" and row.replaced >= 1, row.reason
    assert row.ratio < 1.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", FAST_HF)
def test_hf_fast(name):
    row = _run_hf(name)
    assert row.status == "ok" and row.replaced >= 1, row.reason


def test_fast_subset_names_exist():
    assert set(FAST_FAMILIES) <= set(_FAMILIES), sorted(set(FAST_FAMILIES) - set(_FAMILIES))
    for family, (name, _) in FAST_FAMILIES.items():
        assert name in _FAMILIES[family], (family, name)
    assert set(FAST_HF) <= set(zoo_hf.BUILDERS)
    assert len(zoo_hf.BUILDERS) == 20


def test_exclusions_name_real_families_and_say_why():
    for family, why in EXCLUDE.items():
        assert family in _FAMILIES and len(why) > 10, family


# --- the full matrix (-m compat) --------------------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_timm_family(family):
    if family in EXCLUDE:
        pytest.skip(EXCLUDE[family])
    row = _run_timm(family)
    # converted, or a typed error that says why (recorded in the table); anything else raised above
    assert row.status in ("ok", "not converted")
    if row.status == "not converted":
        assert row.reason.startswith(("NothingToReplaceError", "PolicyError", "AnalysisError")), row.reason


@pytest.mark.compat
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(zoo_hf.BUILDERS))
def test_hf_model(name):
    row = _run_hf(name)
    assert row.status == "ok" and row.replaced >= 1, row.reason


@pytest.mark.compat
def test_zz_write_compatibility_page():
    """Runs last (file order): writes docs/compatibility.md when the whole matrix ran in this session."""
    expected = {f for f in _FAMILIES if f not in EXCLUDE} | {f"hf:{n}" for n in zoo_hf.BUILDERS}
    missing = expected - set(_ROWS)
    if missing:
        pytest.skip(f"partial matrix ({len(missing)} models not run in this session): page not written")
    rows = [_ROWS[k] for k in sorted(expected)]
    zoo.write_matrix(rows, DOCS, time.perf_counter() - _START, "pytest -m compat tests/test_compat.py")
    timm_rows = [r for r in rows if not r.family.startswith("hf:")]
    rate = sum(r.converted for r in timm_rows) / len(timm_rows)
    assert rate >= 0.95, f"timm pass rate {rate:.1%} is below the 95% goal"
    assert all(r.converted for r in rows if r.family.startswith("hf:"))
