"""Decode tuning parameters: measured entries apply only to their device kind and preset, every entry
names a measurement kept in the repo, and unlisted cases get the vendor defaults."""

from __future__ import annotations

import inspect
import json
import pathlib

import pytest

import tqjax
from tqjax.pallas import decode, tuning
from tqjax.platform import Platform

ROOT = pathlib.Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"


def entries():
    return json.loads((ROOT / "tqjax" / "pallas" / "tuning.json").read_text())["decode"]


@pytest.mark.parametrize("entry", entries(), ids=lambda e: f"{e['device_kind']}-{e['preset']}")
def test_entries_are_valid_and_cite_a_measurement(entry):
    assert entry["preset"] in tqjax.PRESETS
    kernel_args = set(inspect.signature(decode.paged_decode).parameters)
    assert set(entry["params"]) <= set(tuning.DEFAULTS["cuda"]) <= kernel_args
    data_file = entry["measured"].split(":")[0]
    assert (ROOT / data_file).is_file(), data_file


def test_measured_entry_applies_only_to_its_device_and_preset():
    h200 = Platform("cuda", "sm90", "NVIDIA H200")
    for preset in tqjax.PRESETS:  # every preset measured there: transposed products, 64-token steps
        params = tuning.decode_params(preset, h200)
        assert params["dot_mode"] == "mma_t" and params["block_tokens"] == 64 and params["num_stages"] == 1, preset
    assert tuning.decode_params("turboquant_4bit_nc", h200)["num_warps"] == 4
    assert tuning.decode_params("turboquant_k8v4", h200)["num_warps"] == 2
    for other in (Platform("cuda", "sm90", H100), Platform("cuda", "sm80", "NVIDIA A100-SXM4-80GB")):
        for preset in ("turboquant_4bit_nc", "turboquant_k8v4"):  # no entries: the CUDA defaults
            assert tuning.decode_params(preset, other) == tuning.DEFAULTS["cuda"]


def test_vendor_defaults():
    mi300 = Platform("rocm", "gfx942", "AMD Instinct MI300X")
    assert tuning.decode_params("turboquant_k8v4", mi300)["num_stages"] == 1
    assert tuning.store_params(mi300) == {"num_warps": 4, "num_stages": 1}
    # Triton's num_warps counts 64-lane wavefronts on AMD: 4 wavefronts = 256 lanes, one per SIMD of a CU
    assert tuning.store_params(Platform("cuda", "sm90")) == {"num_warps": 4, "num_stages": 1}
    assert tuning.decode_params("turboquant_4bit_nc") == tuning.DEFAULTS["cpu"]  # this test machine
