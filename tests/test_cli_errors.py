"""The error convention shared by every command: one line 'prog: error: ...', exit 2 for a user's mistake, 3 with
a traceback for a bug, 130 for Ctrl-C, and --debug (or RWKVUNET_DEBUG=1) for the traceback."""
from __future__ import annotations

import json


import pytest

from rwkvunet.cli import main as cli_main
from rwkvunet.errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_NOTHING_DONE, UserError, run_main


def _raise(err):
    def body():
        raise err
    return body


def test_user_errors_are_one_line_with_status_2(capsys):
    assert run_main("tool", _raise(UserError("the thing is wrong; do this instead"))) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    assert err == "tool: error: the thing is wrong; do this instead\n"


def test_missing_files_name_the_path(capsys, tmp_path):
    missing = tmp_path / "nope.png"
    assert run_main("tool", lambda: open(missing)) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "no such file" in err


def test_bugs_show_the_traceback_and_ask_for_a_report(capsys):
    assert run_main("tool", _raise(ZeroDivisionError("oops"))) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "bug" in err


def test_running_out_of_host_memory_is_one_line(capsys):
    """`finetune --img-size 100000` failed in PyTorch's CPU allocator and was reported as a bug."""
    import torch

    def allocate():
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: refused by the allocator on any machine

    assert run_main("tool", allocate) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "out of memory (an allocation of 4294967296.0 GiB failed); use a smaller --img-size" in err
    assert run_main("tool", _raise(MemoryError())) == EXIT_NOTHING_DONE
    assert capsys.readouterr().err == ("tool: error: out of memory; use a smaller --img-size or --batch-size, "
                                       "--tile 512 (predict) or a machine with more memory\n")


def test_version_and_a_mistyped_command(capsys):
    """`rwkvunet --version` was "unknown command '--version'"; `rwkvunet predcit` named no command close to it."""
    import rwkvunet

    assert cli_main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rwkvunet {rwkvunet.__version__} (torch ") and "transformers" in out and "timm" in out
    with pytest.raises(SystemExit) as usage:
        cli_main(["predcit", "model", "x.png"])
    assert usage.value.code == 2 and "unknown command 'predcit' (did you mean predict?)" in capsys.readouterr().err


def test_interrupt_is_130_without_a_traceback(capsys):
    assert run_main("tool", _raise(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert "Traceback" not in capsys.readouterr().err


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(UserError):
        run_main("tool", _raise(UserError("x")), debug=True)
    monkeypatch.setenv("RWKVUNET_DEBUG", "1")
    with pytest.raises(UserError):
        run_main("tool", _raise(UserError("x")))


@pytest.mark.parametrize("argv,expected", [
    (["bench", "--models", "zz"], "unknown model 'zz'"),
    (["bench", "--sizes", "0"], "--sizes takes positive whole numbers"),
    (["bench", "--tasks", "fly"], "unknown task 'fly'"),
    (["bench", "--device", "cuda"], "no CUDA device"),
    # a batch of one whose deepest map is 1 x 1: BatchNorm's ValueError after the first cases had run
    (["bench", "--device", "cpu", "--models", "t", "--sizes", "16"], "use --sizes 17 or more, --batch-sizes 2"),
    (["bench", "--device", "cpu", "--models", "t", "--json", "."], "--json . is a folder"),
    # the preset silently replaced --models b with all of its models (minutes more); t,t measured t twice
    (["bench", "--device", "cpu", "--preset", "cpu", "--models", "b"], "drop --models or the preset"),
    (["bench", "--device", "cpu", "--models", "t,t"], "--models repeats t; give each once"),
    (["bench", "--device", "cpu", "--models", "t", "--sizes", "64,32,64"], "--sizes repeats 64"),
])
def test_bench_mistakes_are_one_line_errors(argv, expected, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(argv) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # notes (e.g. smp not installed) may precede
    assert len(errors) == 1 and errors[0].startswith("rwkvunet bench: error: ") and expected in errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("option, value, expected", [
    ("--repeats", "-1", "must be at least 1, got -1"),  # was a traceback: no median of no steps
    ("--steps", "0", "must be at least 1, got 0"),
    ("--warmup", "-2", "must be at least 0, got -2"),
    ("--threads", "0", "must be at least 1, got 0"),
    ("--num-labels", "0", "must be at least 1, got 0"),
    ("--steps", "x", "'x' is not a whole number"),
])
def test_bench_counts_out_of_range_are_usage_errors(option, value, expected, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["bench", "--models", "t", "--sizes", "64", option, value])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"rwkvunet bench: error: argument {option}: {expected}"


def test_every_command_takes_debug(capsys):
    from rwkvunet.cli import COMMANDS

    for command in COMMANDS:  # in this process: a new interpreter per command costs seconds each
        with pytest.raises(SystemExit) as done:
            cli_main([command, "--help"])
        assert done.value.code == 0 and "--debug" in capsys.readouterr().out, command


@pytest.mark.parametrize("command", [["predict", "model", "a.png"], ["bench", "--models", "t"], ["demo", "model"]])
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:3"])
def test_unknown_devices_are_usage_errors(command, device, capsys):
    """``--device tpu`` was torch's RuntimeError when the model moved, reported as a bug in rwkvunet."""
    with pytest.raises(SystemExit) as done:
        cli_main(command + ["--device", device])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"rwkvunet {command[0]}: error: argument --device: {device!r} is not a "
                                            "device this command runs on; use cpu, cuda or cuda:N")


@pytest.mark.parametrize("text, expected", [("cpu", "cpu"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1")])
def test_device_names_are_normalised(text, expected, monkeypatch):
    import torch

    from rwkvunet.errors import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the index is checked only where CUDA exists
    assert device_name(text) == expected


def test_a_missing_gpu_index_is_refused(monkeypatch):
    import argparse

    import torch

    from rwkvunet.errors import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_name("cuda:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match=r"has 2 CUDA device\(s\), numbered from 0 to 1"):
        device_name("cuda:2")


def test_bench_json_replaces_only_its_own_results(tmp_path, capsys):
    """--json of a file that is not an earlier result is refused before anything is measured; a missing folder too
    (both ended the whole run in an error about NAME.tmp)."""
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    argv = ["bench", "--device", "cpu", "--models", "t", "--sizes", "32", "--tasks", "infer", "--steps", "1",
            "--repeats", "1", "--warmup", "0", "--cpu-memory", "in-process"]
    assert cli_main(argv + ["--json", str(notes)]) == EXIT_NOTHING_DONE
    assert "is not an earlier bench result" in capsys.readouterr().err and notes.read_text() == '{"mine": 1}'
    assert cli_main(argv + ["--json", str(tmp_path / "no" / "b.json")]) == EXIT_NOTHING_DONE
    assert "does not exist" in capsys.readouterr().err
    result = tmp_path / "bench.json"
    for _ in range(2):  # written, then replaced by the re-run
        assert cli_main(argv + ["--json", str(result)]) == 0
        assert json.loads(result.read_text())["results"][0]["model"] == "t"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "notes.json"]
