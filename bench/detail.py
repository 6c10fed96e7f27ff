"""Benchmark: the detail network's training and inference patches/s, as a share of the machine's dense FLOP/s.

    python bench/detail.py [--profiles default,paper] [--batch 16,1] [--infer-batch 64,4] [--steps 20,4]
                           [--warmup 3,2] [--repeats 3] [--threads 0] [--variants] [--compile]
                           [--no-inference] [--peak-seconds 1.5] [--matmul-size 4096] [--conv-batch 8]
                           [--json PATH]

Per profile of ``facedetail.detail.networks`` (one region's network; a comma list gives one value per
profile, in the order of ``--profiles``):

* training patches/s: the supervised step of ``facedetail.detail.train.train_step`` with the losses
  reduced to L1 + GAN: generator forward; discriminator on (input ‖ target) and (input ‖
  fake.detach()), displacements in tanh units, loss ``0.5 (lsgan(real, 1) + lsgan(fake, 0))``,
  backward, Adam step; ``generator_loss`` (L1 in mm against a random target + LSGAN on the
  discriminator's new scores), backward, Adam step. Adam: lr 2e-4, betas (0.5, 0.999), one per
  network. The trainer's PCA-weight and re-rendering terms are left out;
* inference patches/s: generator forward in eval mode under ``torch.inference_mode``;
* FLOPs per patch from ``flops_per_patch`` (forward; 2 per multiply-add; convs, linears, the PCA
  product). A training step is credited ``3·G + 8·D``: the generator's forward and its backward
  for weights and activations (≈ 2 forwards); the discriminator's three forwards, the full
  backward of its two passes in its own step (2 x 2 D) and the activations-only backward of the
  generator's pass (1 D). A setting that also computes the discriminator's weight gradients in
  the generator's pass (the trainer does; they are zeroed unused) does 3·G + 9·D and is still
  credited 3·G + 8·D;
* achieved FLOP/s as a fraction of the machine's dense float32 throughput, measured in the same run
  (before each profile and at the end; the best counts): ``torch.matmul`` of two ``--matmul-size``²
  matrices, a 3x3 convolution 256→256 on 64² maps and the network's own kind, a 4x4 stride-2
  convolution 256→256 on 64² maps, both at batch ``--conv-batch`` in the faster memory format.
  Fractions are against the best of the three;
* the ratio line: ours against a baseline measured in the same run. Baseline: the step as
  ``facedetail.detail.train`` runs it: torch's own thread count, ``use_deterministic_algorithms``
  (which also fills every new buffer with NaN), NCHW, ``torch.optim.Adam`` without
  ``foreach``/``fused`` (a loop over the parameters on a CPU), the discriminator's weight gradients
  computed in the generator's backward, eager. Ours, each part kept because it measured faster:
  ``--threads`` threads (0 = the cores this process may use), fused Adam, the discriminator frozen
  during the generator's backward (pix2pix's ``set_requires_grad(netD, False)``: the same updates),
  still deterministic but without the NaN fill (``torch.utils.deterministic.fill_uninitialized_memory
  = False``: the same bits run to run), huge pages for torch's large buffers
  (``THP_MEM_ALLOC_ENABLE=1``), NCHW for training and channels_last for inference, eager.
  ``--variants`` also times each change alone, channels_last, determinism off and oneDNN
  (``torch.backends.mkldnn``) off; ``--compile`` adds ours under ``torch.compile`` (inductor; with
  ``--variants`` the baseline too; the compile time is reported apart, as the first call's).

Each setting runs in a process of its own (huge pages are a per-process switch, and one setting's
freed memory should not serve another's); as many as memory allows run side by side and are timed
in turns, run r of each before run r + 1 of any. Every rate is the best of ``--repeats`` runs of
``--steps`` steps after ``--warmup`` steps; the ``cores`` column is CPU time / wall of that run, so
a value well below the thread count means another process shared the machine. At the end: the
paper's schedule (706 training pairs x 2,937 patches (1,547 upper + 1,390 lower) x 250 epochs)
projected at the paper profile's measured training rate, and on one A100 / H100 SXM from their
data-sheet FP32 and TF32 dense peaks, at the fraction of peak reached here and at an assumed 40 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facedetail.detail.losses import generator_loss, lsgan_loss
from facedetail.detail.networks import (
    PROFILES,
    DetailGenerator,
    DetailNetConfig,
    PatchDiscriminator,
    flops_per_patch,
    normalize_patch,
    parameter_counts,
)

TORCH_THREADS = torch.get_num_threads()
"""Torch's own thread count, read before anything here changes it: the baseline's."""
LR, BETAS = 2e-4, (0.5, 0.999)
GOAL = 0.40
"""The issue's goal: the paper profile's training step at >= 40 % of the machine's dense throughput."""
PAPER_PAIRS = 706
PAPER_PATCHES = {"upper": 1547, "lower": 1390}
PAPER_EPOCHS = 250
GPUS = {  # dense peaks from the vendors' data sheets, FLOP/s
    "A100 (FP32)": 19.5e12, "A100 (TF32)": 156e12, "H100 SXM (FP32)": 67e12, "H100 SXM (TF32)": 495e12}
ASSUMED_GPU_FRACTION = 0.40
OURS_CHANNELS_LAST = {"default": (False, True), "paper": (False, True)}
"""Whether ours uses channels_last in (training, inference), per profile (measured with ``--variants``)."""
PROCESS_BYTES = 500_000_000
"""What a worker process holds besides the networks (torch, oneDNN's buffers), for sizing the groups."""
DEFAULTS = {  # per profile: batch, inference batch, steps, warmup
    "batch": {"default": 16, "paper": 1}, "infer_batch": {"default": 64, "paper": 4},
    "steps": {"default": 20, "paper": 4}, "warmup": {"default": 3, "paper": 2}}


# --- settings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """How a step runs; every setting computes the same losses and updates."""

    name: str
    threads: int
    channels_last: bool = False
    infer_channels_last: bool | None = None  # inference's memory format when it differs from training's
    adam: str = "loop"  # "loop" (torch's default on a CPU), "foreach" or "fused"; "" for inference
    freeze_d: bool = False  # no discriminator weight gradients in the generator's backward (pix2pix)
    deterministic: bool = True  # torch.use_deterministic_algorithms(True), as facedetail.detail.train sets it
    fill_new: bool = True  # ... which also fills every new buffer with NaN (torch.utils.deterministic's default)
    mkldnn: bool = True
    thp: bool = False  # THP_MEM_ALLOC_ENABLE=1: torch's allocator asks for huge pages for buffers >= 2 MB
    compile: bool = False

    def describe(self) -> str:
        parts = [f"{self.threads} threads", "channels_last" if self.channels_last else "NCHW"]
        if self.adam:
            parts.append(f"Adam {self.adam}")
            parts.append("D frozen in G step" if self.freeze_d else "D grads in G step")
        if not self.deterministic:
            parts.append("not deterministic")
        elif not self.fill_new:
            parts.append("deterministic without NaN fill")
        if not self.mkldnn:
            parts.append("oneDNN off")
        if self.thp:
            parts.append("huge pages")
        parts.append("torch.compile" if self.compile else "eager")
        return ", ".join(parts)

    def for_inference(self) -> Setting:
        """The same without what only training has (Adam, the discriminator's freezing), in inference's format."""
        cl = self.channels_last if self.infer_channels_last is None else self.infer_channels_last
        return replace(self, channels_last=cl, infer_channels_last=None, adam="", freeze_d=False)


def settings(threads: int, use_compile: bool, variants: bool, channels_last: bool = False,
             infer_channels_last: bool = True) -> tuple[Setting, Setting, list[Setting]]:
    """The baseline, ours, and (with ``variants``) each change alone; each distinct setting once."""
    baseline = Setting("baseline: the trainer's way", TORCH_THREADS)
    ours = Setting("ours", threads, channels_last=channels_last, infer_channels_last=infer_channels_last,
                   adam="fused", freeze_d=True, fill_new=False, thp=True)
    alone: list[Setting] = [replace(ours, name="ours + torch.compile", compile=True)] if use_compile else []
    if variants:
        if threads != TORCH_THREADS:
            alone.append(replace(baseline, name=f"+ {threads} threads", threads=threads))
        alone += [replace(baseline, name="+ Adam foreach", adam="foreach"),
                  replace(baseline, name="+ Adam fused", adam="fused"),
                  replace(baseline, name="+ D frozen in G step", freeze_d=True),
                  replace(baseline, name="+ huge pages", thp=True),
                  replace(baseline, name="+ channels_last", channels_last=True),
                  replace(baseline, name="- NaN fill of new buffers", fill_new=False),
                  replace(baseline, name="- deterministic", deterministic=False),
                  replace(baseline, name="- oneDNN (mkldnn off)", mkldnn=False),
                  replace(ours, name="ours, NCHW" if channels_last else "ours + channels_last",
                          channels_last=not channels_last, infer_channels_last=not infer_channels_last)]
        if use_compile:
            alone.append(replace(baseline, name="+ torch.compile", compile=True))
    seen = {_key(baseline), _key(ours)}
    distinct = []
    for s in alone:
        if _key(s) not in seen:
            seen.add(_key(s))
            distinct.append(s)
    return baseline, ours, distinct


def _key(s: Setting) -> tuple[Any, ...]:
    return tuple(v for k, v in asdict(s).items() if k != "name")


@contextmanager
def applied(setting: Setting) -> Iterator[None]:
    """Threads, determinism and the oneDNN switch of ``setting`` for the duration; restored after."""
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    _apply(setting)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def _apply(setting: Setting) -> None:
    torch.set_num_threads(setting.threads)
    torch.backends.mkldnn.enabled = setting.mkldnn
    torch.use_deterministic_algorithms(setting.deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = setting.fill_new  # type: ignore[attr-defined]


def _format(setting: Setting) -> torch.memory_format:
    return torch.channels_last if setting.channels_last else torch.contiguous_format


# --- timing ---------------------------------------------------------------------------------------

def rate_for(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Calls/s of ``fn`` over at least ``seconds`` (and 2 calls) after one untimed call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0), n


# --- the machine's dense throughput ---------------------------------------------------------------

def dense_peaks(threads: int, seconds: float, matmul_size: int, conv_batch: int) -> dict[str, dict[str, Any]]:
    """FLOP/s of a large float32 matmul and two large convolutions (forward), on ``threads`` threads."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, Any]] = {}
    with applied(Setting("peak", threads, deterministic=False)), torch.inference_mode():
        n = matmul_size
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        per_s, _ = rate_for(lambda: torch.matmul(a, b), seconds)
        out["matmul"] = {"what": f"torch.matmul {n}x{n} @ {n}x{n} fp32", "flops": per_s * 2 * n**3}
        x = torch.randn(conv_batch, 256, 64, 64, generator=gen)
        for key, what, kernel, stride in (("conv3x3", "conv 3x3 256→256, 64², pad 1", 3, 1),
                                          ("conv4x4s2", "conv 4x4/2 256→256, 64²→32², pad 1", 4, 2)):
            conv = nn.Conv2d(256, 256, kernel, stride=stride, padding=1)
            nn.init.normal_(conv.weight, 0.0, 0.02, generator=gen)
            best: tuple[float, str] = (0.0, "")
            for fmt, label in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels_last")):
                c, xi = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
                y_numel = c(xi).numel()
                per_s, _ = rate_for(lambda c=c, xi=xi: c(xi), seconds)
                best = max(best, (per_s * 2 * y_numel * 256 * kernel * kernel, label))
            out[key] = {"what": f"{what}, batch {conv_batch} fp32", "flops": best[0], "format": best[1]}
    return out


# --- the network ----------------------------------------------------------------------------------

def step_flops(flops: dict[str, int]) -> int:
    """Nominal FLOPs of one training step per patch: ``3·G + 8·D`` (see the module docstring)."""
    return 3 * flops["generator"] + 8 * flops["discriminator"]


def _inputs(config: DetailNetConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalized V patch batch and a random displacement target in mm (σ 0.3 mm)."""
    gen = torch.Generator().manual_seed(seed)
    p = config.patch_size
    x = normalize_patch(torch.rand(batch, 1, p, p, generator=gen))
    target = 0.3 * torch.randn(batch, 1, p, p, generator=gen)
    return x, target


def _generator(config: DetailNetConfig, setting: Setting) -> DetailGenerator:
    g = DetailGenerator(config, seed=0)
    p2 = config.patch_size**2
    basis = torch.randn(config.pca_components, p2, generator=torch.Generator().manual_seed(1))
    g.set_pca_basis(basis / p2**0.5)  # rows of unit length, as a PCA basis has
    return g.to(memory_format=_format(setting))


def _adam(module: nn.Module, kind: str) -> torch.optim.Adam:
    kw = {"foreach": True} if kind == "foreach" else {"fused": True} if kind == "fused" else {}
    return torch.optim.Adam(module.parameters(), lr=LR, betas=BETAS, **kw)


def training_step(config: DetailNetConfig, setting: Setting, batch: int) -> Callable[[], float]:
    """A closure running one full training step of a fresh G and D (and their Adam); returns the G loss.

    The supervised step of ``facedetail.detail.train.train_step`` with the losses the benchmark asks
    for: the discriminator sees (input ‖ displacement / max_displacement_mm), LSGAN; the generator
    loss is ``generator_loss`` with the L1 in mm against the random target and the LSGAN term.
    """
    fmt = _format(setting)
    g = _generator(config, setting).train()
    d = PatchDiscriminator(config.discriminator, seed=2).to(memory_format=fmt).train()
    opt_g, opt_d = _adam(g, setting.adam), _adam(d, setting.adam)
    g_run: Callable[..., Any] = torch.compile(g) if setting.compile else g
    d_run: Callable[..., Any] = torch.compile(d) if setting.compile else d
    x, target = (t.contiguous(memory_format=fmt) for t in _inputs(config, batch, seed=3))
    scale = config.max_displacement_mm
    real_input = torch.cat([x, target / scale], dim=1)

    def step() -> float:
        fake = g_run(x).displacement_mm
        if setting.freeze_d:
            d.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        loss_d = 0.5 * (lsgan_loss(d_run(real_input), real=True)
                        + lsgan_loss(d_run(torch.cat([x, fake.detach() / scale], dim=1)), real=False))
        loss_d.backward()
        opt_d.step()
        if setting.freeze_d:  # pix2pix's set_requires_grad(netD, False): the G step needs no D weight gradients
            d.requires_grad_(False)
        loss_g, logged = generator_loss(d_run(torch.cat([x, fake / scale], dim=1)), fake, target_mm=target)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        return logged["total"]

    return step


def inference_call(config: DetailNetConfig, setting: Setting, batch: int) -> Callable[[], torch.Tensor]:
    """A closure running the generator forward (eval, inference mode) on one batch."""
    g = _generator(config, setting).eval()
    g_run: Callable[..., Any] = torch.compile(g) if setting.compile else g
    x, _ = _inputs(config, batch, seed=3)
    x = x.contiguous(memory_format=_format(setting))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return g_run(x).displacement_mm

    return forward


class Worker:
    """One setting in its own process (``--worker``): its threads, oneDNN switch, huge pages and allocator.

    Huge pages cannot be switched inside a process (torch reads ``THP_MEM_ALLOC_ENABLE`` once), and
    a process of its own keeps one setting's freed memory from serving another's allocations. The
    same process measures the training step, then (with the training state freed) inference.
    """

    def __init__(self, setting: Setting, config: DetailNetConfig, warmup: int) -> None:
        self.setting = setting
        spec = {"setting": asdict(setting), "config": config.model_dump(mode="json"), "warmup": warmup}
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if setting.thp else "0"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def send(self, command: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.setting.name!r} ({self.setting.describe()}) ended with "
                             f"status {self.proc.wait()} (out of memory?)")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def worker_main(spec_text: str) -> None:
    """The ``--worker`` process. Commands on stdin, one JSON reply line each:

    ``build train|infer B`` (build for batch B, call once, warm up), ``run N`` (time N calls),
    ``end`` (one more call: finite output? peak RSS), ``quit``.
    """
    spec = json.loads(spec_text)
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the replies
    setting, config = Setting(**spec["setting"]), DetailNetConfig.model_validate(spec["config"])
    _apply(setting)
    fn: Callable[[], object] | None = None
    for line in sys.stdin:
        command = line.split()
        if command[0] == "build":
            fn = None  # free the last closure's networks and optimizer state first
            gc.collect()
            kind, batch = command[1], int(command[2])
            make = training_step if kind == "train" else inference_call
            t0 = time.perf_counter()
            fn = make(config, setting if kind == "train" else setting.for_inference(), batch)
            t1 = time.perf_counter()
            fn()  # the first call (compiles under torch.compile): timed apart, not in the rate
            t2 = time.perf_counter()
            for _ in range(max(0, spec["warmup"] - 1)):
                fn()
            reply.write(json.dumps({"build_s": t1 - t0, "first_call_s": t2 - t1}) + "\n")
        elif command[0] == "run" and fn is not None:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(int(command[1])):
                fn()
            wall = time.perf_counter() - w0
            reply.write(json.dumps({"wall": wall, "cpu": time.process_time() - c0}) + "\n")
        elif command[0] == "end" and fn is not None:
            out = fn()
            reply.write(json.dumps({"finite": bool(torch.isfinite(torch.as_tensor(out)).all()),
                                    "peak_rss_gb": peak_rss_gb()}) + "\n")
        else:
            return


def _timed_turns(workers: list[Worker], kind: str, batch: int, flops: int, steps: int,
                 repeats: int) -> list[dict[str, Any]]:
    """Build ``kind`` in every worker (in parallel), then time them in turns; the fastest run of each counts."""
    for w in workers:
        w.send(f"build {kind} {batch}")
    ready = [w.answer() for w in workers]
    runs: list[list[tuple[float, float]]] = [[] for _ in workers]
    for _ in range(repeats):
        for j, w in enumerate(workers):
            r = w.ask(f"run {steps}")
            runs[j].append((r["wall"] / steps, r["cpu"] / r["wall"]))
    results = []
    for w, rd, rs in zip(workers, ready, runs, strict=True):
        end = w.ask("end")
        seconds, cores = min(rs)
        per_s = batch / seconds
        s = w.setting if kind == "train" else w.setting.for_inference()
        fields = {k: v for k, v in asdict(s).items() if k != "name"}
        results.append({"setting": s.name, "describe": s.describe(), **fields, "batch": batch,
                        "patches_per_s": per_s, "seconds_per_call": seconds, "all_seconds_per_call": [r[0] for r in rs],
                        "median_patches_per_s": batch / statistics.median(r[0] for r in rs), "cores": cores,
                        "flops_per_s": per_s * flops, **rd, **end})
    return results


def measure(settings_: list[Setting], config: DetailNetConfig, batch: int, infer_batch: int | None,
            flops: dict[str, int], steps: int, warmup: int, repeats: int,
            group: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training (and, unless ``infer_batch`` is None, inference) rates of each setting.

    One process per setting, ``group`` alive at a time. A group's workers build together, then are
    timed in turns: run r of every setting before run r + 1 of any, so that a load that comes and
    goes falls on all of them alike. Then the same workers measure inference, each distinct
    inference setting (the training ones without Adam) once.
    """
    train: list[dict[str, Any]] = []
    infer: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    group = max(1, group)
    for i0 in range(0, len(settings_), group):
        chunk = settings_[i0:i0 + group]
        print(f"  measuring {config.patch_size}² patches, settings {i0 + 1}-{i0 + len(chunk)} of {len(settings_)}: "
              f"{'; '.join(s.name for s in chunk)}", file=sys.stderr, flush=True)
        workers = [Worker(s, config, warmup) for s in chunk]
        try:
            train += _timed_turns(workers, "train", batch, step_flops(flops), steps, repeats)
            if infer_batch is not None:
                fresh = []
                for w in workers:
                    key = _key(w.setting.for_inference())
                    if key not in seen:
                        seen.add(key)
                        fresh.append(w)
                infer += _timed_turns(fresh, "infer", infer_batch, flops["generator"], steps, repeats)
            for w in workers:
                w.send("quit")
        finally:
            for w in workers:
                w.close()
    return train, infer


def _mem_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def training_bytes(counts: dict[str, int]) -> int:
    """Float32 parameters, gradients and Adam's two moments of G and D: 16 bytes per parameter."""
    return 16 * (counts["generator"] + counts["discriminator"])


def activation_bytes(config: DetailNetConfig, batch: int) -> int:
    """A generous guess at a training step's activations: 64 float32 maps of the patch size per patch."""
    return 4 * 64 * config.patch_size**2 * batch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# --- projection -----------------------------------------------------------------------------------

def paper_schedule_patches() -> int:
    """Patch visits of the paper's schedule, both regions: 706 pairs x (1,547 + 1,390) x 250 epochs."""
    return PAPER_PAIRS * sum(PAPER_PATCHES.values()) * PAPER_EPOCHS


def projection(train_rate: float, flops_per_step_patch: int, fraction_here: float) -> dict[str, Any]:
    """The paper's schedule at ``train_rate`` patches/s here, and on each GPU at two assumed fractions."""
    patches = paper_schedule_patches()
    total_flops = patches * flops_per_step_patch
    gpus = {}
    for name, peak in GPUS.items():
        gpus[name] = {"peak_flops": peak,
                      "days_at_fraction_here": total_flops / (peak * fraction_here) / 86400,
                      "days_at_assumed_fraction": total_flops / (peak * ASSUMED_GPU_FRACTION) / 86400}
    return {"patches": patches, "flops": total_flops, "here_seconds": patches / train_rate,
            "here_days": patches / train_rate / 86400, "fraction_here": fraction_here,
            "assumed_gpu_fraction": ASSUMED_GPU_FRACTION, "gpus": gpus}


# --- the command line -----------------------------------------------------------------------------

def per_profile(text: str | None, profiles: list[str], key: str) -> dict[str, int]:
    """``"8"`` (every profile), ``"16,1"`` (one per profile) or None (each profile's default)."""
    if text is None:
        fallback = DEFAULTS[key]
        return {p: fallback.get(p, fallback["default"]) for p in profiles}
    values = [int(v) for v in text.split(",")]
    if len(values) == 1:
        values *= len(profiles)
    if len(values) != len(profiles) or min(values) < 0:
        raise SystemExit(f"--{key.replace('_', '-')} {text!r}: give one value or one per profile ({len(profiles)})")
    return dict(zip(profiles, values, strict=True))


def _g(x: float) -> str:
    return f"{x / 1e9:,.2f} G"


def _row(r: dict[str, Any], unit: str) -> str:
    first = f"; first call {r['first_call_s']:.0f} s" if r["compile"] else ""
    return (f"    {r['setting']:<28} {r['patches_per_s']:11.3f} {unit:<9} {r['seconds_per_call']:8.3f} s "
            f"{r['flops_per_s'] / 1e9:8.1f} GFLOP/s {r['fraction_of_peak']:7.1%} of peak "
            f"{r['cores']:5.2f} cores  ({r['describe']}{first})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="default,paper", help=f"comma list of {', '.join(PROFILES)}")
    parser.add_argument("--batch", help="training batch per profile (default 16 for default, 1 for paper)")
    parser.add_argument("--infer-batch", help="inference batch per profile (default 64, 4)")
    parser.add_argument("--steps", help="timed steps per run, per profile (default 20, 4)")
    parser.add_argument("--warmup", help="untimed steps first, per profile (default 3, 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="our thread count (0 = the cores we may use)")
    parser.add_argument("--variants", action="store_true", help="also time each change from the baseline alone")
    parser.add_argument("--compile", action="store_true", help="also time ours and the baseline under torch.compile")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference measurement")
    parser.add_argument("--peak-seconds", type=float, default=1.5, help="seconds per dense-throughput kernel")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--conv-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown or not profiles:
        raise SystemExit(f"--profiles: unknown {unknown}; choose from {', '.join(PROFILES)}")
    batch, infer_batch = per_profile(args.batch, profiles, "batch"), per_profile(args.infer_batch, profiles,
                                                                                  "infer_batch")
    steps, warmup = per_profile(args.steps, profiles, "steps"), per_profile(args.warmup, profiles, "warmup")
    if min(batch.values()) < 1 or min(infer_batch.values()) < 1 or min(steps.values()) < 1:
        raise SystemExit("--batch, --infer-batch and --steps must be at least 1")
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores

    print(f"detail network benchmark: torch {torch.__version__}, {cores} cores usable "
          f"({platform.processor() or platform.machine()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), oneDNN {torch.backends.mkldnn.is_available()}; "
          f"threads: torch default {TORCH_THREADS}, ours {threads}; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    peak_runs = [dense_peaks(threads, args.peak_seconds, args.matmul_size, args.conv_batch)]
    result: dict[str, Any] = {"torch": torch.__version__, "cores": cores, "threads": {"torch_default": TORCH_THREADS,
                              "ours": threads}, "load_average_start": os.getloadavg()[0], "profiles": {}}

    for k, name in enumerate(profiles):
        if k:
            peak_runs.append(dense_peaks(threads, args.peak_seconds, args.matmul_size, args.conv_batch))
        config = PROFILES[name]
        baseline, ours, alone = settings(threads, args.compile, args.variants, *OURS_CHANNELS_LAST[name])
        counts, flops = parameter_counts(config), flops_per_patch(config)
        train_flops, infer_flops = step_flops(flops), flops["generator"]
        need, avail = training_bytes(counts), _mem_available()
        print(f"profile {name}: {config.patch_size}² patches, generator {counts['generator']:,} parameters, "
              f"discriminator {counts['discriminator']:,}; forward FLOPs/patch: generator {_g(flops['generator'])}, "
              f"discriminator {_g(flops['discriminator'])}; training step 3·G + 8·D = {_g(train_flops)}/patch; "
              f"parameters + gradients + Adam: {need / 1e9:.2f} GB")
        entry: dict[str, Any] = {"patch_size": config.patch_size, "parameters": counts, "flops_per_patch": flops,
                                 "train_flops_per_patch": train_flops, "infer_flops_per_patch": infer_flops,
                                 "batch": batch[name], "infer_batch": infer_batch[name], "steps": steps[name],
                                 "warmup": warmup[name]}
        if avail is not None and 1.5 * need > avail:
            print(f"  skipped: needs about {1.5 * need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available")
            entry["skipped"] = "memory"
            result["profiles"][name] = entry
            continue
        avail = avail or need * 6.0
        # A training setting holds about 1.3x parameters, gradients and Adam's moments, plus activations.
        group = int(0.7 * avail // (1.3 * need + activation_bytes(config, batch[name]) + PROCESS_BYTES))
        train, infer = measure([baseline, ours, *alone], config, batch[name],
                               None if args.no_inference else infer_batch[name], flops, steps[name], warmup[name],
                               args.repeats, group)
        entry["training"] = train
        entry["training_ratio"] = train[1]["patches_per_s"] / train[0]["patches_per_s"]
        if infer:
            entry["inference"] = infer
            entry["inference_ratio"] = infer[1]["patches_per_s"] / infer[0]["patches_per_s"]
        entry["peak_rss_gb"] = max(r["peak_rss_gb"] for r in train + entry.get("inference", []))
        result["profiles"][name] = entry

    peak_runs.append(dense_peaks(threads, args.peak_seconds, args.matmul_size, args.conv_batch))
    peaks = {}
    for key in peak_runs[0]:
        best_run = max(peak_runs, key=lambda run, key=key: run[key]["flops"])[key]
        peaks[key] = {**best_run, "all_flops": [run[key]["flops"] for run in peak_runs]}
    best_key = max(peaks, key=lambda k: peaks[k]["flops"])
    peak = peaks[best_key]["flops"]
    result.update(peaks=peaks, peak_flops=peak, peak_kernel=best_key, load_average_end=os.getloadavg()[0])
    for entry in result["profiles"].values():  # fractions against the best of start and end
        for r in entry.get("training", []) + entry.get("inference", []):
            r["fraction_of_peak"] = r["flops_per_s"] / peak
            r["fraction_of_each_peak"] = {k: r["flops_per_s"] / v["flops"] for k, v in peaks.items()}

    print("dense float32 throughput of this machine, measured before each profile and at the end "
          f"({threads} threads; the best counts):")
    for key, v in peaks.items():
        fmt = f", {v['format']}" if v.get("format") else ""
        mark = "  <- peak used below" if key == best_key else ""
        runs = " / ".join(f"{f / 1e9:.1f}" for f in v["all_flops"])
        print(f"  {v['what']:<50}: {v['flops'] / 1e9:8.1f} GFLOP/s ({runs}{fmt}){mark}")
    for name, entry in result["profiles"].items():
        if "training" not in entry:
            continue
        print(f"profile {name}, training, batch {entry['batch']} (best of {args.repeats} x {entry['steps']} steps; "
              f"{_g(entry['train_flops_per_patch'])}FLOP/patch):")
        for r in entry["training"]:
            print(_row(r, "patches/s"))
        print(f"    {'ratio (ours / baseline)':<28} {entry['training_ratio']:11.2f}x")
        if "inference" in entry:
            print(f"profile {name}, inference, batch {entry['infer_batch']} "
                  f"({_g(entry['infer_flops_per_patch'])}FLOP/patch):")
            for r in entry["inference"]:
                print(_row(r, "patches/s"))
            print(f"    {'ratio (ours / baseline)':<28} {entry['inference_ratio']:11.2f}x")
        print(f"    largest peak RSS of one setting's process: {entry['peak_rss_gb']:.2f} GB")

    paper = result["profiles"].get("paper", {})
    if "training" in paper:
        best = paper["training"][1]
        frac = best["fraction_of_peak"]
        verdict = "met" if frac >= GOAL else "NOT met"
        print(f"goal: paper-profile training at >= {GOAL:.0%} of the dense peak: {frac:.1%} ({verdict}; "
              f"batch {paper['batch']}, {best['describe']})")
        proj = projection(best["patches_per_s"], paper["train_flops_per_patch"], frac)
        result["goal"] = {"fraction": frac, "target": GOAL, "met": frac >= GOAL}
        result["projection"] = proj
        print(f"projection: the paper's schedule, {PAPER_PAIRS} pairs x {sum(PAPER_PATCHES.values()):,} patches "
              f"({PAPER_PATCHES['upper']:,} upper + {PAPER_PATCHES['lower']:,} lower) x {PAPER_EPOCHS} epochs "
              f"= {proj['patches']:,} patch steps, {proj['flops']:.3g} FLOP at {_g(paper['train_flops_per_patch'])}"
              f"FLOP/patch:")
        print(f"  {'this machine':<18}: {proj['here_days']:12,.0f} days ({proj['here_days'] / 365.25:,.1f} years) "
              f"at {best['patches_per_s']:.3f} patches/s")
        for gpu, v in proj["gpus"].items():
            print(f"  {gpu:<18}: {v['days_at_fraction_here']:9,.1f} days at {frac:.0%} of its "
                  f"{v['peak_flops'] / 1e12:g} TFLOP/s (the fraction reached here), "
                  f"{v['days_at_assumed_fraction']:8,.1f} days at an assumed {ASSUMED_GPU_FRACTION:.0%}")
        print("  (GPU lines are FLOP arithmetic on data-sheet dense peaks, not measurements; at batch 1 a GPU "
              "is unlikely to reach either fraction)")
    elif "paper" not in profiles:
        print("projection: needs the paper profile (--profiles ...,paper)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2])
    else:
        main()
