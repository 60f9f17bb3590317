"""Transport: ArrayRecord round trip, validation, and what may leave a device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from common.serialization import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_TRAIN_METRICS,
    build_outbound_record,
    from_arrayrecord,
    to_arrayrecord,
)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(shapes, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}.lora_A.default.weight": torch.randn(s, generator=gen) for i, s in enumerate(shapes)
    }
    back = from_arrayrecord(
        to_arrayrecord(tensors), {n: tuple(t.shape) for n, t in tensors.items()}
    )
    assert list(back) == list(tensors)
    for name in tensors:
        assert torch.equal(back[name], tensors[name])


def test_validation_rejects_bad_records() -> None:
    good = {"a": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="shape mismatch"):
        from_arrayrecord(to_arrayrecord(good), {"a": (3, 2)})
    with pytest.raises(ValueError, match="missing"):
        from_arrayrecord(to_arrayrecord(good), {"a": (2, 3), "b": (1,)})
    with pytest.raises(ValueError, match="unexpected"):
        from_arrayrecord(to_arrayrecord(good | {"c": torch.zeros(1)}), {"a": (2, 3)})
    bad = ArrayRecord({"a": Array(np.full((2, 3), np.nan, dtype=np.float32))})
    with pytest.raises(ValueError, match="non-finite"):
        from_arrayrecord(bad, {"a": (2, 3)})


def test_outbound_record_holds_only_shared_tensors_and_allowed_metrics() -> None:
    shared = {"x.lora_A.default.weight": torch.ones(2, 2)}
    personal = {"x.lora_B.default.weight": torch.ones(2, 2)}
    record = build_outbound_record(
        shared,
        shared_names=shared,
        metrics={"train_loss": 1.0, "num-examples": 3},
        allowed_metrics=ALLOWED_TRAIN_METRICS,
    )
    assert list(record["arrays"].keys()) == list(shared)
    assert dict(record["metrics"]) == {"train_loss": 1.0, "num-examples": 3}
    with pytest.raises(ValueError, match="exactly the shared tensors"):
        build_outbound_record(
            shared | personal,
            shared_names=shared,
            metrics={},
            allowed_metrics=ALLOWED_TRAIN_METRICS,
        )
    with pytest.raises(ValueError, match="may not leave the device"):
        build_outbound_record(
            {},
            shared_names=(),
            metrics={"per_example_loss_0": 1.0},
            allowed_metrics=ALLOWED_EVAL_METRICS,
        )


def test_legacy_outbound_record_is_the_ordered_shared_update_only() -> None:
    from flwr.common import parameters_to_ndarrays

    names = ["a.lora_A.default.weight", "b.lora_A.default.weight"]
    update = {names[1]: torch.full((2,), 2.0), names[0]: torch.ones(3)}
    record = build_outbound_record(
        update,
        shared_names=names,
        metrics={"num-examples": 1, "train_loss": 0.5, "weight": 1, "declined": 0},
        allowed_metrics=ALLOWED_TRAIN_METRICS,
        legacy="fitres",
    )
    from flwr.compat.common import recorddict_compat as compat

    res = compat.recorddict_to_fitres(record, keep_input=True)
    arrays = parameters_to_ndarrays(res.parameters)
    assert [a.tolist() for a in arrays] == [[1.0, 1.0, 1.0], [2.0, 2.0]]  # shared_names order
    assert res.num_examples == 1
    assert set(res.metrics) == {"train_loss", "weight", "declined"}
    assert set(record.keys()) == {
        "fitres.parameters",
        "fitres.num_examples",
        "fitres.metrics",
        "fitres.status",
    }
    with pytest.raises(ValueError, match="may not leave"):
        build_outbound_record(
            update,
            shared_names=names,
            metrics={"loss_of_line_3": 1.0},
            allowed_metrics=ALLOWED_TRAIN_METRICS,
            legacy="fitres",
        )
