"""``rwkvunet bench``: training and inference speed and peak memory, with every comparison made in one run.

For each case (model, input size, batch, precision, backend) it measures

* inference: forward under ``torch.inference_mode`` in eval mode, of the model as
  ``timm.utils.reparameterize_model`` leaves it (BatchNorm folded into the convolutions), images/s; with the
  ``onnxruntime`` backend, the model exported to ONNX (:mod:`rwkvunet.onnx_export`, checked against eager) and
  run by ONNX Runtime on the CPU with the same number of threads;
* training: one step = forward + loss (CE + Dice, as the segmenter trains) + backward + AdamW, images/s;
* peak memory: CUDA ``max_memory_allocated`` over the case (weights, gradients, optimizer state and
  activations); CPU the rise of the peak resident memory that building the case and running its warm-up
  steps causes in a fresh process (``peak MiB``), and that process's whole peak resident set (``process MiB``:
  what the machine must hold, the interpreter and libraries included).

Every model of a group (same device, size, batch, precision, backend and task) is timed in the same run,
and on the CPU the models take turns, one short round each, so that a shared, busy machine slows them alike;
the ratio column divides each time by that of the reference model (smp's ``Unet("resnet34")`` when
segmentation-models-pytorch is installed). CUDA times come from CUDA events after warm-up; all figures are
medians over the timed steps.

On the CPU, malloc is set up as the ``rwkvunet`` command sets it for every command (freed activations are
kept for reuse, see :mod:`rwkvunet.ops.cpu_memory`) before any case runs, so every model is timed under the
same settings; ``RWKVUNET_CPU_ALLOCATOR=system`` measures glibc's defaults instead.
On a CPU that other programs keep busy, ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of
spinning between operations) spares the other programs; on a quiet machine it slows every model, the ones
with many small operations most, so leave it unset for timings. The environment line records both.

    rwkvunet bench                                    # CPU: T/S/B and smp Unet(resnet34), one 3x256x256 image
    rwkvunet bench --device cuda --preset h100        # the GPU figures: B at 224 (batch 24) and 512 (batch 8)
    rwkvunet bench --models t,b --sizes 224 --batch-sizes 8 --precisions fp32,bf16 --backend eager,compile \\
        --tasks train,infer --json bench.json
    rwkvunet bench --device cpu --models t,s,b,smp --tasks infer --backend eager,onnxruntime   # the ORT targets
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

from ..errors import UserError, device_name, whole_number
from ..ops.cpu_memory import cpu_allocator_state, keep_freed_cpu_memory
from .profiling import format_shares, profile_steps, rows_for_file

SMP_MODEL = "smp_unet_r34"
ONNXRUNTIME = "onnxruntime"


def model_aliases() -> Dict[str, str]:
    """``--models`` name -> model: every registered encoder variant (``t`` or ``rwkv_unet_t``) and smp."""
    from ..models.encoder import ENCODER_VARIANTS

    return {"smp": SMP_MODEL, "unet_r34": SMP_MODEL, SMP_MODEL: SMP_MODEL,
            **{m: m for m in ENCODER_VARIANTS}, **{f"rwkv_unet_{m}": m for m in ENCODER_VARIANTS}}

# one entry per case group: models are compared within a group
PRESETS: Dict[str, List[dict]] = {
    # the CPU target: one 3x256x256 image, inference latency of T (and S, B) against smp Unet(resnet34)
    "cpu": [
        dict(models="t,s,b,smp", sizes="256", batch_sizes="1", precisions="fp32", backend="eager",
             tasks="infer", repeats=7, steps=3, warmup=3),
        dict(models="t,smp", sizes="256", batch_sizes="1", precisions="fp32", backend="eager",
             tasks="train", repeats=3, steps=2, warmup=2),
        dict(models="t,s,b,smp", sizes="256", batch_sizes="1", precisions="fp32", backend="onnxruntime",
             tasks="infer", repeats=7, steps=3, warmup=3),
    ],
    # only the GPU targets (B at 224 batch 24 bf16 beside smp, B at 512 batch 8 bf16): a few minutes
    "h100-targets": [
        dict(models="b,smp", sizes="224", batch_sizes="24", precisions="bf16", backend="eager",
             tasks="train,infer", repeats=1, steps=30, warmup=10),
        dict(models="b", sizes="512", batch_sizes="8", precisions="bf16", backend="eager",
             tasks="train,infer", repeats=1, steps=20, warmup=5),
    ],
    # the GPU figures of the authors' table (shared anchors): B at 224 batch 24 and 512 batch 8, bf16 autocast
    "h100": [
        dict(models="b,smp", sizes="224", batch_sizes="24", precisions="bf16", backend="eager",
             tasks="train,infer", repeats=1, steps=30, warmup=10),
        dict(models="b", sizes="512", batch_sizes="8", precisions="bf16", backend="eager",
             tasks="train,infer", repeats=1, steps=20, warmup=5),
        dict(models="t,s,b", sizes="256", batch_sizes="8", precisions="bf16", backend="eager",
             tasks="train,infer", repeats=1, steps=20, warmup=5),
        dict(models="b", sizes="224", batch_sizes="24", precisions="fp32", backend="eager",
             tasks="train,infer", repeats=1, steps=20, warmup=5),
        dict(models="b", sizes="224", batch_sizes="24", precisions="bf16", backend="compile",
             tasks="train,infer", repeats=1, steps=30, warmup=5),
        dict(models="b", sizes="512", batch_sizes="8", precisions="bf16", backend="compile",
             tasks="train", repeats=1, steps=20, warmup=5),
    ],
}


#: Speed targets on the CPU, as ratios to smp Unet(resnet34) measured in the same group: (model, backend, task,
#: largest ratio), checked by the ``cpu`` preset (fp32, one 3x256x256 image).
CPU_TARGETS = [("t", "eager", "infer", 0.8), ("s", "eager", "infer", 1.2), ("b", "eager", "infer", 2.0),
               ("t", "eager", "train", 1.0), ("t", ONNXRUNTIME, "infer", 1.0), ("s", ONNXRUNTIME, "infer", 1.2),
               ("b", ONNXRUNTIME, "infer", 2.0)]


def format_targets(results: List["Result"]) -> str:
    """One line per CPU target that this run measured: the ratio to smp and whether it is met."""
    lines = []
    for model, backend, task, limit in CPU_TARGETS:
        for r in results:
            if (r.model, r.backend, r.task, r.device, r.size, r.batch, r.precision) != (
                    model, backend, task, "cpu", 256, 1, "fp32") or r.error is not None:
                continue
            if r.reference != SMP_MODEL or r.ratio_to_reference is None:  # a ratio to another model is no verdict
                lines.append(f"  {model} {backend} {task}: no verdict, smp was not measured beside it (add smp to "
                             f"--models, with segmentation-models-pytorch installed)")
                continue
            verdict = "met" if r.ratio_to_reference <= limit else "missed"
            lines.append(f"  {model} {backend} {task}: {r.ratio_to_reference:.2f} x smp (target <= {limit}): "
                         f"{verdict}")
    return ("CPU targets, ratios from this run:\n" + "\n".join(lines)) if lines else ""


@dataclass
class Case:
    model: str
    size: int
    batch: int
    precision: str
    backend: str
    task: str
    device: str
    num_labels: int
    in_channels: int
    onnx_file: Optional[str] = None  # onnxruntime: where the exported graph is (written by the first build)

    def label(self) -> str:
        return f"{self.model}_{self.size}px_b{self.batch}_{self.precision}_{self.backend.replace(':', '-')}_{self.task}"


@dataclass
class Result:
    model: str
    size: int
    batch: int
    precision: str
    backend: str
    task: str
    device: str
    params_m: float
    ms_per_step: float
    images_per_s: float
    ms_min: float
    ms_max: float
    steps: int
    peak_mib: Optional[float]
    process_peak_mib: Optional[float] = None
    ratio_to_reference: Optional[float] = None
    reference: Optional[str] = None
    error: Optional[str] = None
    samples_ms: List[float] = field(default_factory=list)
    profile_shares: Optional[Dict[str, float]] = None  # with --profile: share of operator time per kind of work


# --- models ---------------------------------------------------------------------------------------------
def smp_available() -> bool:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(name: str, num_labels: int, in_channels: int) -> torch.nn.Module:
    if name == SMP_MODEL:
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet34", encoder_weights=None, in_channels=in_channels, classes=num_labels)
    from ..models.rwkv_unet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation

    config = RWKVUNetConfig(variant=name, num_labels=num_labels, in_channels=in_channels)
    return RWKVUNetForSemanticSegmentation(config)


def _loss_config(num_labels: int):
    from ..models.rwkv_unet import RWKVUNetConfig

    return RWKVUNetConfig(variant="t", num_labels=num_labels)


def forward_fn(name: str, model: torch.nn.Module, loss_config) -> Callable:
    """``fn(x, labels=None)`` returning logits, or the training loss when labels are given (the same
    CE + Dice loss for every model, so training steps compare like with like)."""
    from ..models.rwkv_unet.modeling_rwkv_unet import segmentation_loss

    if name == SMP_MODEL:
        def run(x, labels=None):
            logits = model(x)
            return logits if labels is None else segmentation_loss(logits, labels, loss_config)
    else:
        def run(x, labels=None):
            out = model(pixel_values=x, labels=labels)
            return out.logits if labels is None else out.loss
    return run


# --- memory ---------------------------------------------------------------------------------------------
class CpuPeakMemory:
    """Rise of the peak resident set size while a case runs (bytes)."""

    def __init__(self):
        self.can_reset = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        gc.collect()
        if self.can_reset:
            self._reset()
            self.base = self._status("VmRSS") or 0
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def peak(self) -> float:
        if self.can_reset:
            hwm = self._status("VmHWM") or 0
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return max(0, hwm - self.base)


def cpu_peak_in_subprocess(case: Case, warmup: int) -> Tuple[Optional[float], Optional[float]]:
    """``(rise, whole)``: the peak resident memory (bytes) that building the case and running ``warmup + 1``
    steps adds, and the process's whole peak resident set, measured in a fresh process: in this one, memory
    freed by earlier cases stays mapped and would hide the rise."""
    import subprocess

    cmd = [sys.executable, "-m", "rwkvunet.commands.bench", "--memory-probe", json.dumps(asdict(case)),
           "--warmup", str(warmup), "--threads", str(torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
        rise, whole = out.stdout.strip().splitlines()[-1].split()
        return float(rise), float(whole)
    except Exception:
        return None, None


def _memory_probe(case_json: str, warmup: int) -> int:
    case = Case(**json.loads(case_json))
    # VmHWM belongs to this process image; ru_maxrss would carry the (larger) parent's peak over the exec
    before = CpuPeakMemory._status("VmRSS")
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = Runner(case)
    for _ in range(warmup + 1):
        r.step()
    if before is not None:
        whole = CpuPeakMemory._status("VmHWM")
        print(whole - before, whole)
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        print(whole - ru_before * scale, whole)
    return 0


# --- timing ---------------------------------------------------------------------------------------------
class Runner:
    """One case ready to run: model, optimizer, inputs and its collected step times."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        self.device = torch.device(case.device)
        torch.manual_seed(seed)
        self.train = case.task == "train"
        self.samples: List[float] = []
        self.peak_bytes = 0.0
        self.process_peak_bytes: Optional[float] = None  # CPU: the probe process's whole peak resident set
        self.optimizer = None
        if case.backend == ONNXRUNTIME:
            self._build_onnxruntime(case)
            return
        model = build_model(case.model, case.num_labels, case.in_channels)
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        model.train(self.train)
        if not self.train:  # inference speed the way users get it (Segmenter, predict): BatchNorm folded
            model = reparameterize_model(model, inplace=True)
        model.to(self.device, memory_format=torch.channels_last)
        self.model = model
        self.x = torch.randn(case.batch, case.in_channels, case.size, case.size, device=self.device)
        self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, case.num_labels, (case.batch, case.size, case.size), device=self.device)
        self.fn = forward_fn(case.model, model, _loss_config(case.num_labels))
        if case.backend != "eager":
            mode = None if case.backend == "compile" else case.backend.split(":", 1)[1]
            self.fn = torch.compile(self.fn, mode=mode)
        if self.train:
            kwargs = dict(lr=1e-4, weight_decay=0.01)
            if self.device.type == "cuda":
                kwargs["fused"] = True
            self.optimizer = torch.optim.AdamW(model.parameters(), **kwargs)

    def _build_onnxruntime(self, case: Case) -> None:
        """The model exported to ONNX (checked against eager) and run by ONNX Runtime with torch's thread count.
        The first build exports to ``case.onnx_file``; later ones (the memory probe) load that file."""
        from ..backends import onnxruntime_session
        from ..onnx_export import INPUT_NAME, export_onnx

        self.params_m = float("nan")
        if not os.path.exists(case.onnx_file):
            model = build_model(case.model, case.num_labels, case.in_channels).eval()
            self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
            export_onnx(model, case.onnx_file, in_channels=case.in_channels)
            del model
        self.model = self.labels = None
        self.session = onnxruntime_session(case.onnx_file)
        self.x = torch.randn(case.batch, case.in_channels, case.size, case.size)
        feed = {INPUT_NAME: self.x.numpy()}
        self.fn = lambda x, labels=None: self.session.run(None, feed)

    def autocast(self):
        if self.case.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.case.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def step(self) -> None:
        if self.train:
            with self.autocast():
                loss = self.fn(self.x, self.labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), self.autocast():
                self.fn(self.x)

    def timed_steps(self, n: int) -> List[float]:
        """n steps, returning each step's time in ms."""
        times = []
        if self.device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for start, end in events:
                start.record()
                self.step()
                end.record()
            torch.cuda.synchronize(self.device)
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for _ in range(n):
                t0 = time.perf_counter()
                self.step()
                times.append((time.perf_counter() - t0) * 1e3)
        self.samples.extend(times)
        return times

    def release(self) -> None:
        self.model = self.optimizer = self.fn = self.x = self.labels = self.session = None


def _memory_start(device: torch.device, cpu_mem: Optional[CpuPeakMemory]) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif cpu_mem is not None:
        cpu_mem.start()


def _memory_peak(device: torch.device, cpu_mem: Optional[CpuPeakMemory], since: float = 0.0) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - since
    return cpu_mem.peak() if cpu_mem is not None else float("nan")


def profile_case(case: Case, runner: "Runner", folder: str) -> Dict[str, float]:
    """Profile three more steps of a timed case; writes ``folder/<case>.txt`` and returns the category shares."""
    table, shares = profile_steps(runner.step, 3, torch.device(case.device))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, case.label() + ".txt")
    with open(path, "w") as f:
        f.write("\n".join(rows_for_file(case.label(), shares, table)) + "\n")
    return shares


def run_group(cases: List[Case], repeats: int, steps: int, warmup: int, progress,
              cpu_memory: str = "subprocess", profile_dir: Optional[str] = None) -> List[Result]:
    """Time the cases of one group. On the CPU they stay built and take turns (``repeats`` rounds of
    ``steps`` steps each); on CUDA each is built, measured and freed in turn (the device is not shared)."""
    results: List[Result] = []
    device = torch.device(cases[0].device)
    interleave = device.type == "cpu"
    cpu_mem = CpuPeakMemory() if device.type == "cpu" else None
    runners: Dict[int, Runner] = {}
    errors: Dict[int, str] = {}
    shares: Dict[int, Dict[str, float]] = {}

    def profile(i: int, r: Runner) -> None:
        if profile_dir and cases[i].backend != ONNXRUNTIME:  # torch.profiler does not see ONNX Runtime's kernels
            shares[i] = profile_case(cases[i], r, profile_dir)

    bases: Dict[int, float] = {}

    def base_of(i: int) -> float:
        return bases.get(i, 0.0)

    def build(i: int) -> Optional[Runner]:
        _memory_start(device, cpu_mem)
        # CUDA: what other live tensors hold is not this case's
        base = bases[i] = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0.0
        try:
            r = Runner(cases[i])
            for _ in range(warmup):
                r.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as err:  # report the case as failed and carry on with the others
            errors[i] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            return None
        r.peak_bytes = _memory_peak(device, cpu_mem, base)
        return r

    if interleave:
        for i in range(len(cases)):
            r = build(i)
            if r is not None:
                runners[i] = r
            progress.update(1)
        for _ in range(repeats):
            for i, r in runners.items():
                r.timed_steps(steps)
                progress.update(1)
        for i, r in runners.items():
            profile(i, r)
    else:
        for i in range(len(cases)):
            r = build(i)
            progress.update(1)
            if r is not None:
                try:
                    for _ in range(repeats):
                        r.timed_steps(steps)
                        progress.update(1)
                    r.peak_bytes = max(r.peak_bytes, _memory_peak(device, cpu_mem, base_of(i)))
                    profile(i, r)
                    runners[i] = r
                except Exception as err:  # e.g. out of memory: report it and go on
                    errors[i] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                r.release()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                progress.update(repeats)

    if device.type == "cpu" and cpu_memory == "subprocess":
        for i, r in runners.items():
            rise, whole = cpu_peak_in_subprocess(cases[i], warmup)
            r.peak_bytes = float("nan") if rise is None else rise
            r.process_peak_bytes = whole

    for i, case in enumerate(cases):
        r = runners.get(i)
        if r is None:
            results.append(Result(case.model, case.size, case.batch, case.precision, case.backend, case.task,
                                  case.device, float("nan"), float("nan"), float("nan"), float("nan"),
                                  float("nan"), 0, None, error=errors.get(i, "not run")))
            continue
        med = statistics.median(r.samples)
        results.append(Result(
            case.model, case.size, case.batch, case.precision, case.backend, case.task, case.device,
            round(r.params_m, 2), med, case.batch / (med / 1e3), min(r.samples), max(r.samples), len(r.samples),
            r.peak_bytes / 2 ** 20 if r.peak_bytes == r.peak_bytes else None,
            process_peak_mib=None if r.process_peak_bytes is None else r.process_peak_bytes / 2 ** 20,
            samples_ms=[round(s, 3) for s in r.samples], profile_shares=shares.get(i)))
        r.release()
    ref = next((res for res in results if res.model == SMP_MODEL and res.error is None), None)
    if ref is None:
        ref = next((res for res in results if res.error is None), None)
    for res in results:
        if ref is not None and res.error is None:
            res.ratio_to_reference = res.ms_per_step / ref.ms_per_step
            res.reference = ref.model
    return results


# --- table ----------------------------------------------------------------------------------------------
def format_table(results: List[Result]) -> str:
    head = ("model", "params M", "device", "size", "batch", "prec", "backend", "task", "ms/step", "min-max ms",
            "img/s", "peak MiB", "process MiB", "time / ref")
    rows = [head]
    for r in results:
        if r.error:
            rows.append((r.model, "", r.device, str(r.size), str(r.batch), r.precision, r.backend, r.task,
                         "failed: " + r.error[:60], "", "", "", "", ""))
            continue
        rows.append((
            r.model, f"{r.params_m:.2f}", r.device, str(r.size), str(r.batch), r.precision, r.backend, r.task,
            f"{r.ms_per_step:.1f}", f"{r.ms_min:.0f}-{r.ms_max:.0f}", f"{r.images_per_s:.1f}",
            "" if r.peak_mib is None else f"{r.peak_mib:.0f}",
            "" if r.process_peak_mib is None else f"{r.process_peak_mib:.0f}",
            "" if r.ratio_to_reference is None else f"{r.ratio_to_reference:.2f} x {r.reference}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def environment(device: str) -> dict:
    from ..ops import kernel_hub

    env = dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
               threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=device)
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["bi_wkv"] = "cuda kernel" if kernel_hub.cuda_bi_wkv() is not None else "pytorch (no kernel)"
    else:
        from ..ops import cpu_kernel

        env["bi_wkv"] = "cpu kernel" if cpu_kernel.cpu_kernel() is not None else "pytorch"
        env["cpu_allocator"] = cpu_allocator_state()
        env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


# --- command --------------------------------------------------------------------------------------------
def _csv(value: str) -> List[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


#: Values of the options that make up a group when neither they nor --preset are given.
GROUP_DEFAULTS = dict(models="t,s,b,smp", sizes="256", backend="eager", tasks="infer,train")
#: Options that --preset sets (a preset is a list of groups).
GROUP_OPTIONS = ("models", "sizes", "batch_sizes", "precisions", "backend", "tasks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a prepared set of groups (it sets the model/size/batch/precision/backend/task "
                             "options, which are not given with it): 'cpu' the CPU targets (eager and ONNX Runtime "
                             "inference of T, S, B and T's training step beside smp, each ratio with its verdict), "
                             "'h100' the GPU figures, 'h100-targets' only the GPU targets")
    parser.add_argument("--device", default=None, type=device_name,
                        help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--models", default=None,
                        help="comma list of encoder variants (rwkvunet.ENCODER_VARIANTS) and smp (smp "
                             f"Unet(resnet34), when installed); default {GROUP_DEFAULTS['models']}")
    parser.add_argument("--sizes", default=None,
                        help=f"input heights = widths, comma list; default {GROUP_DEFAULTS['sizes']}")
    parser.add_argument("--batch-sizes", default=None, help="comma list; default 1 on CPU, 8 on CUDA")
    parser.add_argument("--precisions", default=None, help="fp32, bf16 (autocast), fp16 (autocast); "
                        "default fp32 on CPU, fp32,bf16 on CUDA")
    parser.add_argument("--backend", "--compile", dest="backend", default=None,
                        help="eager, compile (torch.compile), compile:MODE (e.g. compile:max-autotune) or "
                             "onnxruntime (inference on the CPU in fp32: the model exported to ONNX, checked "
                             "against eager, run by ONNX Runtime with --threads threads), comma list; every model, "
                             f"smp's too, runs through each; default {GROUP_DEFAULTS['backend']}")
    parser.add_argument("--tasks", default=None,
                        help=f"infer, train, comma list; default {GROUP_DEFAULTS['tasks']}")
    parser.add_argument("--num-labels", type=whole_number(1), default=9, help="output classes (default %(default)s)")
    parser.add_argument("--in-channels", type=whole_number(1), default=3, help="input channels (default %(default)s)")
    parser.add_argument("--steps", type=whole_number(1), default=None,
                        help="timed steps per round (default 5 CPU, 30 CUDA)")
    parser.add_argument("--repeats", type=whole_number(1), default=None,
                        help="rounds; on the CPU the models take turns each round (default 5 CPU, 1 CUDA)")
    parser.add_argument("--warmup", type=whole_number(0), default=None,
                        help="untimed steps first (default 2 CPU, 10 CUDA)")
    parser.add_argument("--threads", type=whole_number(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-memory", choices=("subprocess", "in-process"), default="subprocess",
                        help="CPU peak memory: measured per case in a fresh process (default; exact, costs a "
                        "process start per case) or from this process's peak RSS (approximate)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, profile 3 more steps of each case with torch.profiler: the share of "
                             "operator time per kind of work (matmul/conv, normalisation, copies, Bi-WKV scans, "
                             "...) goes into the table and JSON, the top operators into DIR/<case>.txt")
    parser.add_argument("--json", default=None, help="write every result (with all step times) to this file")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)


def _groups(args, device: str) -> List[dict]:
    if args.preset:
        given = [f"--{key.replace('_', '-')}" for key in GROUP_OPTIONS if getattr(args, key) is not None]
        if given:  # they were silently overridden by the preset's own
            raise UserError(f"--preset {args.preset} sets the models, sizes, batches, precisions, backends and tasks "
                            f"itself; drop {', '.join(given)} or the preset")
        groups = [dict(g) for g in PRESETS[args.preset]]
        for g in groups:  # explicit timing options still apply
            for key in ("repeats", "steps", "warmup"):
                if getattr(args, key) is not None:
                    g[key] = getattr(args, key)
        return groups
    cpu = device == "cpu"
    for key in GROUP_OPTIONS:  # a repeated entry measured the same case twice
        values = _csv(getattr(args, key) or "")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"--{key.replace('_', '-')} repeats {', '.join(repeated)}; give each once")
    return [dict(
        models=args.models or GROUP_DEFAULTS["models"], sizes=args.sizes or GROUP_DEFAULTS["sizes"],
        batch_sizes=args.batch_sizes or ("1" if cpu else "8"),
        precisions=args.precisions or ("fp32" if cpu else "fp32,bf16"),
        backend=args.backend or GROUP_DEFAULTS["backend"], tasks=args.tasks or GROUP_DEFAULTS["tasks"],
        repeats=args.repeats or (5 if cpu else 1), steps=args.steps or (5 if cpu else 30),
        warmup=args.warmup if args.warmup is not None else (2 if cpu else 10),
    )]


def run(args) -> int:
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        if json.loads(args.memory_probe)["device"] == "cpu":
            keep_freed_cpu_memory()  # as in the parent process, which this one stands in for
        return _memory_probe(args.memory_probe, args.warmup or 0)

    if args.json:
        check_json_path(args.json)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    have_smp = smp_available()
    aliases = model_aliases()
    plan = []  # (group settings, cases)
    skipped = set()
    for g in _groups(args, device):
        models = []
        for m in _csv(g["models"]):
            if m.lower() not in aliases:
                variants = [name for alias, name in aliases.items() if alias == name != SMP_MODEL]
                raise UserError(f"unknown model {m!r}; use {', '.join(variants)} or smp")
            name = aliases[m.lower()]
            if name == SMP_MODEL and not have_smp:
                print("rwkvunet bench: note: segmentation-models-pytorch is not installed, so smp Unet(resnet34) is "
                      "left out (pip install segmentation-models-pytorch)", file=sys.stderr)
                continue
            models.append(name)
        for prec in _csv(g["precisions"]):
            if prec not in ("fp32", "bf16", "fp16"):
                raise UserError(f"unknown precision {prec!r}; use fp32, bf16 or fp16")
        for comp in _csv(g["backend"]):
            if comp not in ("eager", "compile", ONNXRUNTIME) and not comp.startswith("compile:"):
                raise UserError(f"unknown backend {comp!r}; use eager, compile, compile:MODE or onnxruntime")
        for task in _csv(g["tasks"]):
            if task not in ("infer", "train"):
                raise UserError(f"unknown task {task!r}; use infer or train")
        for size in _csv(g["sizes"]):
            for batch in _csv(g["batch_sizes"]):
                for prec in _csv(g["precisions"]):
                    for comp in _csv(g["backend"]):
                        for task in _csv(g["tasks"]):
                            if comp == ONNXRUNTIME and (task != "infer" or prec != "fp32" or device != "cpu"):
                                skipped.add(f"{task} {prec} on {device}")
                                continue
                            cases = [Case(m, _positive(size, "--sizes"), _positive(batch, "--batch-sizes"), prec,
                                          comp, task, device, args.num_labels, args.in_channels) for m in models]
                            for c in cases:
                                _check_trainable(c)
                            if cases:
                                plan.append((g, cases))
    if skipped:
        print(f"rwkvunet bench: note: onnxruntime runs fp32 inference on the CPU; left out: {', '.join(sorted(skipped))}",
              file=sys.stderr)
    if not plan:
        raise UserError("nothing to measure: no model, or only combinations that cannot run (onnxruntime needs "
                        "--tasks infer --precisions fp32 --device cpu)")
    onnx_dir = None
    if any(c.backend == ONNXRUNTIME for _, cases in plan for c in cases):
        from ..onnx_export import require_onnx

        require_onnx()
        onnx_dir = tempfile.TemporaryDirectory(prefix="rwkvunet-bench-")
        for _, cases in plan:
            for c in cases:
                if c.backend == ONNXRUNTIME:
                    c.onnx_file = os.path.join(onnx_dir.name, c.label() + ".onnx")
    if device == "cpu":
        # set before any case runs, so that every model (smp's too) is timed with the same malloc settings,
        # whichever runs first; RWKVUNET_CPU_ALLOCATOR=system measures glibc's defaults instead
        keep_freed_cpu_memory()
    env = environment(device)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    total = sum(len(c) * (1 + g["repeats"]) for g, c in plan)
    results: List[Result] = []
    with tqdm(total=total, desc="bench", unit="round", file=sys.stderr) as progress:
        for g, cases in plan:
            group = run_group(cases, g["repeats"], g["steps"], g["warmup"], progress, args.cpu_memory,
                              args.profile)
            results.extend(group)
            tqdm.write(format_table(group), file=sys.stdout)
            for res in group:
                if res.profile_shares:
                    tqdm.write(f"where the time goes, {res.model} {res.task}: {format_shares(res.profile_shares)}",
                               file=sys.stdout)
            if args.json:  # written after every group, so an interrupted run keeps what it measured
                _write_json(args.json, env, results)
    if onnx_dir is not None:
        onnx_dir.cleanup()
    print("\n" + format_table(results), flush=True)
    verdicts = format_targets(results) if device == "cpu" else ""
    if verdicts:
        print(verdicts, flush=True)
    if args.json:
        _write_json(args.json, env, results)
        print(f"results written to {args.json}")
    return 1 if any(r.error for r in results) else 0


def _check_trainable(case: Case) -> None:
    """A training step at batch 1 whose deepest map is 1 x 1 fails in BatchNorm; say so before anything runs."""
    from ..models.baselines import SMP_SIZE_DIVISOR
    from ..models.rwkv_unet.modeling_rwkv_unet import SIZE_DIVISOR

    stride = SMP_SIZE_DIVISOR if case.model == SMP_MODEL else SIZE_DIVISOR
    if case.task == "train" and case.batch == 1 and case.size <= stride:
        raise UserError(f"a training step of {case.model} at size {case.size} and batch 1 leaves BatchNorm one value "
                        f"per channel (its deepest map is 1 x 1); use --sizes {stride + 1} or more, --batch-sizes 2 "
                        "or more, or --tasks infer")


def check_json_path(path: str, keys=("environment", "results"), earlier: str = "an earlier bench result") -> None:
    """Refuse, before measuring anything, a --json that cannot be written or would replace another kind of file:
    only a JSON object with exactly ``keys`` (``earlier``: an earlier result of the same program) is replaced,
    since re-running a benchmark into the same file is the usual case."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--json {path} is a folder; give a file name (e.g. {target / 'bench.json'})")
    if not target.parent.is_dir():
        raise UserError(f"--json {path}: the folder {target.parent} does not exist; create it or give another path")
    if target.exists():
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
            replaceable = isinstance(data, dict) and set(data) == set(keys)
        except (UnicodeDecodeError, ValueError):
            replaceable = False
        if not replaceable:
            raise UserError(f"--json {path} exists and is not {earlier}; give another file name (only such a result "
                            "is replaced)")


def _write_json(path: str, env: dict, results: List[Result]) -> None:
    def clean(value):  # strict JSON: no NaN
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(dict(environment=env, results=[asdict(r) for r in results])), f, indent=1)
    os.replace(tmp, path)


def _positive(value: str, flag: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{flag} takes positive whole numbers separated by commas, got {value!r}")
    return number


def main(argv=None) -> int:
    from ..errors import run_main

    parser = argparse.ArgumentParser(prog="rwkvunet bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    return run_main("rwkvunet bench", lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
