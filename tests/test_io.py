"""Atomic writers: the output appears whole or not at all; JSON is strict."""

import json

import numpy as np
import pandas as pd
import pytest

from kneurons.io import atomic_path, write_json, write_parquet


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("job killed")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_json_is_strict_and_numpy_aware(tmp_path):
    path = tmp_path / "m.json"
    write_json({"lam": float("nan"), "n": np.int64(3), "xs": [np.float32(0.5), float("inf")]}, path)
    assert json.loads(path.read_text()) == {"lam": None, "n": 3, "xs": [0.5, None]}


def test_parquet_round_trip(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "猫"]})
    write_parquet(df, tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)


def test_write_csv_and_read_json_round_trip(tmp_path):
    from kneurons.io import read_json, write_csv, write_json

    table = pd.DataFrame({"a": [1, 2], "b": [0.5, float("nan")]})
    write_csv(table, tmp_path / "sub" / "t.csv")
    with open(tmp_path / "want.csv", "w", encoding="utf-8") as handle:
        table.to_csv(handle, index=False)
    assert (tmp_path / "sub" / "t.csv").read_bytes() == (tmp_path / "want.csv").read_bytes()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.csv"]  # no temporary left
    write_json({"x": [1, 2], "y": "é"}, tmp_path / "d.json")
    assert read_json(tmp_path / "d.json") == {"x": [1, 2], "y": "é"}


def test_neuron_scores_read_the_stored_matrix_by_neuron():
    import numpy as np
    import pandas as pd

    from kneurons.records import SCORE_DTYPE, converged, neuron_scores

    m = np.arange(12, dtype=SCORE_DTYPE).reshape(3, 4)
    records = pd.DataFrame({"uuid": ["a", "b"], "candidate": ["true", "true"],
                            "scores": [m.tobytes(), None]})
    got = neuron_scores(records, [(0, 1), (2, 3)], 3, 4)
    assert got[0].tolist() == [1.0, 11.0] and np.isnan(got[1]).all()
    assert neuron_scores(records, [], 3, 4).shape == (2, 0)
    import pytest

    with pytest.raises(ValueError, match="outside"):
        neuron_scores(records, [(3, 0)], 3, 4)
    assert converged(records).all()
    assert converged(records.assign(converged=[True, False])).tolist() == [True, False]
