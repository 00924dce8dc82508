"""Temperature scaling and the calibration measures, on small synthetic logits with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmtl.errors import FmtlError
from fmtl.spec import META_TEMPERATURE, InputSpec, RunInfo
from fmtl.training import calibrate
from fmtl.training.calibrate import apply_temperature, fit_temperature, softmax
from fmtl.training.checkpoint import read_model_info
from fmtl.training.metrics import (
    brier_score,
    coverage_table,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)


def sampled(temperature: float, count: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits / temperature): that temperature calibrates them exactly."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(count, classes))
    probs = softmax(logits / temperature)
    labels = (probs.cumsum(axis=1) > rng.random((count, 1))).argmax(axis=1)
    return logits, labels


# --- the measures ---------------------------------------------------------------------------------


def test_ece_matches_a_hand_computed_case() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 0, 2])
    # Four images, top-1 confidences 0.9, 0.9, 0.6, 0.4 (the last one's class 2); right, wrong, right, right.
    # Bins (m/15, (m+1)/15]: the 0.9s in bin 13 (accuracy 0.5, gap 0.4), 0.6 in bin 8 (gap 0.4), 0.4 in bin 5
    # (gap 0.6). ECE = (2 * 0.4 + 1 * 0.4 + 1 * 0.6) / 4.
    assert expected_calibration_error(probs, labels) == pytest.approx((2 * 0.4 + 0.4 + 0.6) / 4)
    table = reliability_bins(probs, labels)
    assert table["count"].sum() == 4 and table["count"][13] == 2 and table["count"][8] == 1 and table["count"][5] == 1


def test_bin_edges_are_right_closed() -> None:
    """A confidence of exactly 1/15 * m belongs to bin m - 1: ((m-1)/15, m/15]."""
    probs = np.array([[2 / 3, 1 / 3], [1.0, 0.0]])  # 2/3 = 10/15 exactly: bin 9; 1.0: bin 14
    table = reliability_bins(probs, np.array([0, 0]))
    assert table["count"][9] == 1 and table["count"][14] == 1 and table["count"].sum() == 2


def test_nll_and_brier_by_hand() -> None:
    probs = np.array([[0.5, 0.5], [0.8, 0.2]])
    labels = np.array([0, 1])
    assert negative_log_likelihood(probs, labels) == pytest.approx((-math.log(0.5) - math.log(0.2)) / 2)
    assert brier_score(probs, labels) == pytest.approx(((0.25 + 0.25) + (0.64 + 0.64)) / 2)
    assert math.isfinite(negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1])))  # floored, not infinite


def test_coverage_keeps_the_most_confident() -> None:
    confidence = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.55, 0.52, 0.51])
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])  # the three least confident are wrong
    rows = {row["coverage"]: row for row in coverage_table(probs, labels)}
    assert rows[1.0]["answered"] == 10 and rows[1.0]["accuracy"] == pytest.approx(0.7)
    assert rows[0.9]["answered"] == 9 and rows[0.9]["accuracy"] == pytest.approx(7 / 9)
    assert rows[0.8]["answered"] == 8 and rows[0.8]["min_probability"] == pytest.approx(0.55)
    assert rows[0.95]["answered"] == 10  # ceil(9.5): never fewer answered than asked


# --- the fit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature) -> None:
    logits, labels = sampled(true_temperature, 20_000)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    nll = calibrate.scaled_nll
    assert nll(logits, labels, fitted) <= min(nll(logits, labels, fitted * 1.01), nll(logits, labels, fitted / 1.01))


def test_calibration_lowers_ece_and_nll_and_keeps_argmax() -> None:
    logits, labels = sampled(0.5, 5000)
    result = calibrate.calibrate(logits * 1.0, labels)  # logits / 0.5 would be calibrated: these are too soft
    assert result.fitted and result.temperature < 1
    assert result.after["ece"] < result.before["ece"] / 3 and result.after["nll"] < result.before["nll"]
    raw = softmax(logits)
    np.testing.assert_array_equal(apply_temperature(raw, result.temperature).argmax(1), raw.argmax(1))


def test_log_probabilities_fit_the_same_temperature_as_logits() -> None:
    logits, labels = sampled(1.7, 3000)
    from_probs = calibrate.calibrate_probabilities(softmax(logits).astype(np.float32), labels)
    assert from_probs.temperature == pytest.approx(calibrate.calibrate(logits, labels).temperature, rel=1e-4)


@settings(max_examples=40, deadline=None)
@given(temperature=st.floats(0.05, 20), seed=st.integers(0, 2**16))
def test_apply_temperature_is_softmax_of_scaled_logits(temperature, seed) -> None:
    logits = np.random.default_rng(seed).normal(scale=4.0, size=(16, 7))
    got = apply_temperature(softmax(logits), temperature)
    np.testing.assert_allclose(got, softmax(logits / temperature), atol=1e-9)
    np.testing.assert_array_equal(got.argmax(1), logits.argmax(1))


def test_fit_stays_inside_its_bounds() -> None:
    logits, labels = sampled(1.0, 500)
    wrong = (logits.argmax(1) + 1) % 10  # every label contradicts the logits: the NLL wants T as large as allowed
    assert fit_temperature(logits, wrong) == pytest.approx(calibrate.TEMPERATURE_BOUNDS[1], rel=1e-3)
    assert "edge of its range" in calibrate.calibrate(logits, wrong).note


# --- when not to fit ------------------------------------------------------------------------------


def test_too_few_validation_images_keep_temperature_one() -> None:
    logits, labels = sampled(0.5, calibrate.MIN_VAL_IMAGES - 1)
    result = calibrate.calibrate(logits, labels)
    assert (result.temperature, result.fitted) == (1.0, False)
    assert "199 validation images" in result.note and result.after == result.before


def test_a_class_with_too_few_validation_images_keeps_temperature_one() -> None:
    logits, labels = sampled(0.5, 1000)
    labels = np.where(labels == 3, 4, labels)  # class 3 has no validation image at all
    result = calibrate.calibrate(logits, labels)
    assert (result.temperature, result.fitted) == (1.0, False) and "a class has only 0" in result.note


def test_calibration_off_keeps_temperature_one_and_still_measures() -> None:
    logits, labels = sampled(0.5, 1000)
    result = calibrate.calibrate(logits, labels, enabled=False)
    assert (result.temperature, result.fitted) == (1.0, False) and "--no-calibrate" in result.note
    assert result.before["ece"] > 0.05


# --- old files ------------------------------------------------------------------------------------

SPEC = InputSpec(channels=1, source_size=(28, 28), image_size=32)


def test_model_json_without_temperature_loads_with_one(tmp_path) -> None:
    old = RunInfo("efficientnet_lite0", ["a", "b"], SPEC).to_dict()
    del old["temperature"]
    (tmp_path / "model.json").write_text(json.dumps(old))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert read_model_info(tmp_path).temperature == 1.0
    old["temperature"] = 0.0
    (tmp_path / "model.json").write_text(json.dumps(old))
    with pytest.raises(FmtlError, match="temperature must be"):
        read_model_info(tmp_path)


def test_metadata_round_trip_and_old_metadata() -> None:
    info = RunInfo("efficientnet_lite0", ["a", "b"], SPEC, temperature=0.7234)
    props = info.to_metadata(18)
    assert RunInfo.from_metadata(props).temperature == 0.7234
    del props[META_TEMPERATURE]
    assert RunInfo.from_metadata(props).temperature == 1.0
    for bad in ("nan", "-1", "abc"):
        with pytest.raises(ValueError):
            RunInfo.from_metadata({**props, META_TEMPERATURE: bad})


def test_for_run_off_skips_the_validation_pass() -> None:
    def no_pass() -> np.ndarray:
        raise AssertionError("calibration off must not predict the validation split")

    result = calibrate.for_run(no_pass, np.zeros(10, dtype=np.int64), enabled=False)
    assert (result.temperature, result.fitted, result.images) == (1.0, False, 0)
    logits, labels = sampled(0.5, 1000)
    assert calibrate.for_run(lambda: softmax(logits), labels).temperature == pytest.approx(0.5, rel=0.1)


def test_reports_apply_the_temperature_and_record_it(tmp_path) -> None:
    """reports.finish: model.json's temperature, metrics.json's calibration and coverage, calibration.png."""
    from fmtl.training import reports
    from fmtl.training.checkpoint import write_model_info

    classes = [f"c{i}" for i in range(10)]
    write_model_info(tmp_path, RunInfo("efficientnet_lite0", classes, SPEC, metrics={"val": {"val_acc": 0.5}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    val_logits, val_labels = sampled(0.5, 1000, seed=1)
    fit = calibrate.calibrate(val_logits, val_labels)
    logits, labels = sampled(0.5, 400, seed=2)
    images = np.zeros((400, 1, 28, 28), dtype=np.uint8)
    outcome = reports.TestOutcome(softmax(logits), images, labels, classes, "test", 2, 0)
    history = [{"epoch": 1, "phase": "linear", "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5}]
    report = reports.finish(tmp_path, outcome, history, 1.0, fit)
    assert read_model_info(tmp_path).temperature == fit.temperature != 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["calibration"]["temperature"] == fit.temperature and saved["calibration"]["val"]["images"] == 1000
    test = saved["calibration"]["test"]
    assert test["after"]["ece"] < test["before"]["ece"] and test["after"]["nll"] < test["before"]["nll"]
    assert saved["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))  # argmax unchanged
    assert [row["coverage"] for row in saved["coverage"]] == [1.0, 0.95, 0.9, 0.8]
    assert saved["coverage"][-1]["accuracy"] >= saved["coverage"][0]["accuracy"]
    assert (tmp_path / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    text = reports.summary(tmp_path, report, classes, {"epoch": 1, "val_acc": 0.5}, 1, 60.0)
    assert f"calibration: temperature {fit.temperature:.4f} fitted on 1000 validation images" in text
    assert "test ECE" in text and "val ECE" in text and "min probability" in text
