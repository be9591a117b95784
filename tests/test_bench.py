"""The benchmark harness (bpkit/bench.py) without PyTorch: table formatting, the JSON rows of a
real (small) run, and the clear failure of ``--torch`` where PyTorch is missing."""
import importlib.util
import json
import math

import pytest

from bpkit import bench, bench_torch
from tests import numerics


@pytest.fixture
def user_numerics():
    with numerics.user_numerics():
        yield


def _row(model="mlp", **kw):
    row = {"model": model, "bpkit_step_ms": 1.5, "jax_step_ms": 3.0, "step_ratio": 0.5,
           "bpkit_compile_s": 0.25, "jax_compile_s": 0.5, "compile_ratio": 0.5,
           "bpkit_temp_bytes": 2 ** 20, "jax_temp_bytes": 2 ** 21, "memory_ratio": 0.5}
    row.update(kw)
    return row


def test_format_table():
    text = bench.format_table([_row(), _row("gpt", bpkit_step_ms=123.456)])
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert lines[0].startswith("| model") and "bpkit ms" in lines[0] and "memory" in lines[0]
    assert set(lines[1]) <= {"|", "-"}
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "| mlp " in lines[2] and "1.50" in lines[2] and "3.00" in lines[2]
    assert "1.00" in lines[2] and "2.00" in lines[2]  # temp bytes in MB
    assert "123.46" in lines[3]


def test_torch_table_and_comparison():
    rows = [_row(), _row("gpt", bpkit_step_ms=50.0)]
    cmp = bench.compare_torch(rows, [{"model": "gpt", "torch_eager_step_ms": 100.0},
                                     {"model": "mlp", "torch_eager_step_ms": 3.0}])
    assert [tuple(r) for r in cmp] == [bench.TORCH_ROW_KEYS] * 2
    assert [r["model"] for r in cmp] == ["mlp", "gpt"]  # the order of the main rows
    assert cmp[0]["bpkit_over_torch"] == pytest.approx(0.5)
    assert cmp[1]["bpkit_over_torch"] == pytest.approx(0.5)
    lines = bench.format_torch_table(cmp).splitlines()
    assert len(lines) == 4 and "torch eager ms" in lines[0] and "100.00" in lines[3]


def test_torch_models_match_bench_models():
    assert set(bench_torch.MODEL_NAMES) == set(bench.bench_models())


def test_main_writes_rows(tmp_path, user_numerics):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "mlp", "--repeats", "10", "--remat", "auto",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "torch" not in data
    assert [r["model"] for r in data["rows"]] == ["mlp"]
    row = data["rows"][0]
    assert tuple(row) == bench.ROW_KEYS
    for key in bench.ROW_KEYS[1:]:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, key
    assert data["machine"]["matmul_peak_flops"] > 0
    assert data["machine"]["bpkit_remat"] == "auto"


def test_repeats_below_ten_rejected():
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "mlp", "--repeats", "3"])
    assert e.value.code == 2


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="PyTorch is installed: --torch would run the torch pass")
def test_torch_flag_without_torch(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "mlp", "--torch", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--torch needs PyTorch" in err and "pip install torch==2.13.0" in err
    assert not out.exists()  # fails before any timing


def test_torch_chunks_alternate_with_jax_steps(user_numerics):
    """With a PyTorch server, 5 chunks of its steps alternate with the JAX steps, and the
    median of its reported times becomes the torch column."""
    calls = []

    class FakeServer:
        def time_steps(self, model, steps):
            calls.append((model, steps))
            return [0.010 * (len(calls))] * steps  # 10 ms, 20 ms, ... per chunk

    row, _, torch_ms = bench.bench_model(bench.bench_models()["mlp"], repeats=10,
                                         torch=FakeServer())
    assert calls == [("mlp", 2)] * 5
    assert torch_ms == pytest.approx(30.0)  # the median of 10, 10, 20, ..., 50 ms
    assert tuple(row) == bench.ROW_KEYS
