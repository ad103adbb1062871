"""`rwkvunet bench` on a tiny input: every case measured, table and JSON written, bad options refused."""
import json
from pathlib import Path

import pytest

from rwkvunet.commands import bench
from rwkvunet.errors import UserError


def test_bench_measures_inference_and_training_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--models", "t", "--sizes", "32", "--batch-sizes", "2",
                     "--tasks", "infer,train", "--repeats", "1", "--steps", "2", "--warmup", "0",
                     "--cpu-memory", "in-process", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    results = data["results"]
    assert [(r["model"], r["task"]) for r in results] == [("t", "infer"), ("t", "train")]
    for r in results:
        assert r["error"] is None
        assert r["steps"] == 2 and len(r["samples_ms"]) == 2
        assert r["ms_per_step"] > 0
        assert abs(r["images_per_s"] - 2 / (r["ms_per_step"] / 1e3)) < 1e-6 * r["images_per_s"]
        assert r["ratio_to_reference"] == 1.0  # the only model is its own reference
    assert 2.5 < results[0]["params_m"] < 3.5  # RWKV-UNet-T
    assert data["environment"]["device"] == "cpu"
    # malloc was set up before the first case and the setting is on record
    from rwkvunet.ops.cpu_memory import cpu_allocator_state
    assert data["environment"]["cpu_allocator"] == cpu_allocator_state() != "untouched"
    table = capsys.readouterr().out
    assert "| t " in table and "train" in table and "infer" in table


def test_bench_refuses_unknown_model_and_precision(capsys):
    assert bench.main(["--device", "cpu", "--models", "unet_r50"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--models", "t", "--precisions", "fp8"]) == 2
    assert "unknown precision" in capsys.readouterr().err


def test_categories_of_operators():
    from rwkvunet.commands.profiling import categorise

    assert categorise("aten::mm") == "matmul/conv"
    assert categorise("aten::mkldnn_convolution") == "matmul/conv"
    assert categorise("aten::convolution_backward") == "matmul/conv"
    assert categorise("aten::cumsum_") == "bi-wkv scan"
    assert categorise("bi_wkv::forward") == "bi-wkv scan"
    assert categorise("aten::native_layer_norm") == "normalisation"
    assert categorise("aten::copy_") == "data movement"
    assert categorise("aten::upsample_bilinear2d") == "data movement"
    assert categorise("aten::_foreach_mul_") == "optimizer"
    assert categorise("aten::sigmoid") == "elementwise and other"


def test_bench_profile_writes_operator_tables_and_shares(tmp_path, capsys):
    folder = tmp_path / "profile"
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--models", "t", "--sizes", "32", "--batch-sizes", "1", "--tasks", "infer",
                     "--repeats", "1", "--steps", "1", "--warmup", "0", "--cpu-memory", "in-process",
                     "--profile", str(folder), "--json", str(out)])
    assert rc == 0
    shares = json.loads(out.read_text())["results"][0]["profile_shares"]
    assert abs(sum(shares.values()) - 1) < 1e-3
    assert shares["matmul/conv"] > 0 and shares["bi-wkv scan"] > 0  # T runs both
    text = (folder / "t_32px_b1_fp32_eager_infer.txt").read_text()
    assert "share of operator time: " in text and "aten::" in text
    assert "where the time goes, t infer: " in capsys.readouterr().out


def test_bench_refuses_unknown_backend_and_onnxruntime_training(capsys):
    assert bench.main(["--device", "cpu", "--models", "t", "--backend", "tensorrt"]) == 2
    assert "unknown backend 'tensorrt'" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--models", "t", "--backend", "onnxruntime", "--tasks", "train"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime runs fp32 inference on the CPU" in err and "nothing to measure" in err


@pytest.mark.slow  # exports the model (about a minute on two cores)
def test_bench_runs_models_through_onnxruntime(tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--models", "t", "--sizes", "64", "--tasks", "infer", "--backend",
                     "eager,onnxruntime", "--repeats", "1", "--steps", "2", "--warmup", "1", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["eager", "onnxruntime"]
    assert all(r["error"] is None and r["ms_per_step"] > 0 for r in results)
    assert results[1]["peak_mib"] > 0 and results[1]["process_peak_mib"] > results[1]["peak_mib"]


def test_cpu_targets_are_judged_from_the_measured_ratios():
    def result(model, backend, task, ratio, size=256):
        return bench.Result(model, size, 1, "fp32", backend, task, "cpu", 1.0, 10.0, 100.0, 9.0, 11.0, 3, None,
                            ratio_to_reference=ratio, reference="smp_unet_r34")

    text = bench.format_targets([result("t", "eager", "infer", 0.79), result("s", "onnxruntime", "infer", 1.25),
                                 result("b", "eager", "infer", 1.5, size=512)])  # not the target's size
    lines = text.splitlines()
    assert lines[0].startswith("CPU targets")
    assert lines[1].strip() == "t eager infer: 0.79 x smp (target <= 0.8): met"
    assert lines[2].strip() == "s onnxruntime infer: 1.25 x smp (target <= 1.2): missed"
    assert len(lines) == 3
    assert bench.format_targets([result("t", "compile", "infer", 0.5)]) == ""
    # without smp in the run the ratio is to another model (here to b itself): no verdict, and the fix named
    alone = result("b", "eager", "infer", 1.0)
    alone.reference = "b"
    lines = bench.format_targets([alone]).splitlines()
    assert len(lines) == 2 and "no verdict" in lines[1] and "add smp to --models" in lines[1]
    assert "met" not in lines[1]
    # the preset measures every target
    measured = {(m, g["backend"], t) for g in bench.PRESETS["cpu"] for m in g["models"].split(",")
                for t in g["tasks"].split(",")}
    assert {(m, b, t) for m, b, t, _ in bench.CPU_TARGETS} <= measured


def test_bi_wkv_benchmark_refuses_mistakes_before_measuring(tmp_path, capsys):
    """training/bench_bi_wkv.py: --repeats 0 was statistics' "no median" and --channels -1 a negative-size tensor,
    both tracebacks; --json over another file replaced it after the whole run."""
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "training" / "bench_bi_wkv.py"))
    for argv, words in ((["--repeats", "0"], "--repeats: must be at least 1"),
                        (["--channels", "-1"], "--channels: must be at least 1")):
        with pytest.raises(SystemExit) as done:
            script["main"](argv)
        assert done.value.code == 2 and words in capsys.readouterr().err
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(UserError, match="not an earlier result"):
        script["main"](["--json", str(notes)])
    assert notes.read_text() == "{}"
