"""What the labeling path achieves on the GPU at hand, in one report (issue 8).

    bash benchmarks/gpu_check.sh [--quick] [--device cpu] [--no-compile] [--no-cpu-bf16]

1. model: our AST-base forward vs transformers' ASTForAudioClassification on the same weights
   (random init, 527 labels, saved by transformers and loaded by ast_model): fp32 parity of logits
   and pooled embeddings (<= 1e-4, TF32 off), then clips/s and TFLOP/s under bf16 autocast over a
   batch sweep, against the anchor (800 TFLOP/s of bf16 on an H100); torch.compile in a child
   process with a time budget, so a slow or broken compiler cannot stall the report;
2. fbank: batched compute_fbank on CUDA vs CPU, clips/s and max |difference| (<= 1e-4);
3. end to end in this process, no Ray: decode on a CPU thread pool, fbank on the GPU, the model in
   bf16; clips/s and the part that bounds it;
4. CPU bf16 vs fp32 on the GPU host's CPU (bench_model's study, one batch on all cores): its
   CPU may have native bf16 (AMX, AVX512-BF16) where the development machine has none.

Without CUDA (or with --device cpu) sections 1 to 3 run with small sizes in fp32 (the pipeline's
CPU precision), without torch.compile, to test the script itself (~1.5 min on 2 cores). On an H100
the whole report takes about 3 to 5 minutes, torch.compile's budget included. Exits 1 when a
parity check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from bench_features import SAMPLE_RATE, batched_fbank, make_clips
from bench_model import (
    audioset_base,
    cpu_bf16_study,
    forward_flops,
    forward_under,
    output_differences,
    reference_and_ours,
    synthetic_features,
)
from timing import best_seconds, device_sync

from ast_model.config import ASTConfig
from ast_model.features import FbankConfig, compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits

TOLERANCE = 1e-4  # the model contract's, for logits, embeddings and fbank
CLIP_S = 10.0
DISTINCT_CLIPS = 64  # the end-to-end corpus repeats this many encoded clips
VERDICTS = {True: "PASS", False: "FAIL", None: "skipped"}


@dataclass(frozen=True)
class Sizes:
    parity_batch: int
    model_batches: tuple[int, ...]
    repeats: int
    fbank_clips: int
    fbank_batch: int
    e2e_clips: int
    e2e_batch: int
    cpu_bf16_batch: int


SIZES = {
    "cuda": Sizes(4, (8, 32, 64, 128, 256), 10, 256, 64, 2048, 64, 8),
    "cuda-quick": Sizes(2, (8, 64), 5, 64, 64, 512, 64, 2),
    # A 2-core CPU runs AST-base at ~0.4 clips/s: enough to exercise every path, no more.
    "cpu": Sizes(1, (1, 2), 1, 16, 8, 4, 2, 1),
}


@dataclass(frozen=True)
class Codec:
    description: str
    encode: Callable[[np.ndarray], bytes]  # (N,) float32 16 kHz mono -> file bytes
    decode: Callable[[bytes], np.ndarray]  # file bytes -> (N,) float32 16 kHz mono


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller sweep and corpus on a GPU")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA"
    )
    parser.add_argument("--anchor-tflops", type=float, default=800.0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile-budget-s", type=float, default=150.0)
    parser.add_argument(
        "--cpu-bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="section 4 (default: on a GPU host only; on a CPU-only machine it is "
        "bench_model.py --cpu-bf16's job)",
    )
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="decode threads")
    parser.add_argument("--compile-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    if args.compile_child:
        compile_child(device, dtype, args.compile_child)
        return
    sizes = SIZES[device.type + ("-quick" if device.type == "cuda" and args.quick else "")]
    codec = pick_codec()
    print_environment(device, dtype, codec)

    started = time.perf_counter()
    results: dict[str, bool | None] = {}  # None: skipped
    model, config, rates, ok = check_model(device, dtype, sizes, args.anchor_tflops)
    results["model fp32 parity"] = ok
    if rates and (args.compile if args.compile is not None else device.type == "cuda"):
        best_batch = max(rates, key=rates.get)
        check_compile(device, dtype, best_batch, rates[best_batch], args.compile_budget_s)
    section_done(started)
    results["fbank CUDA vs CPU"] = check_fbank(device, sizes)
    section_done(started)
    check_end_to_end(model, config, device, dtype, sizes, codec, args.workers, rates)
    section_done(started)
    if args.cpu_bf16 if args.cpu_bf16 is not None else device.type == "cuda":
        del model
        print("\n4. CPU bf16 autocast vs fp32 on this host's CPU")
        cpu_bf16_study([sizes.cpu_bf16_batch], [torch.get_num_threads()], repeats=1)
        section_done(started)

    print("\nsummary:")
    for name, passed in results.items():
        print(f"  {name:20s} {VERDICTS[passed]}")
    sys.exit(1 if False in results.values() else 0)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's share, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pick_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    reason = f"no usable CUDA GPU (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    if requested == "cuda":
        sys.exit(f"gpu_check: {reason}; run with --device cpu to test the script on a CPU")
    print(f"gpu_check: {reason}: running the CPU check with small sizes")
    return torch.device("cpu")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32); auto follows the pipeline: bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def precision_name(dtype: torch.dtype | None) -> str:
    return "bf16 autocast" if dtype is not None else "fp32"


def section_done(started: float) -> None:
    print(f"  [{time.perf_counter() - started:.0f} s since start]", flush=True)


def print_environment(device: torch.device, dtype: torch.dtype | None, codec: Codec) -> None:
    import transformers

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = (
            f"{torch.cuda.get_device_name()} (compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB)"
        )
    else:
        card = f"CPU only ({platform.processor() or platform.machine()})"
    print(f"device:       {card}")
    print(
        f"software:     Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"host:         {usable_cpus()} usable CPUs ({os.cpu_count()} on the host), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"precision:    {precision_name(dtype)}")
    print(f"decoder:      {codec.description}", flush=True)


# -- 1. the model --------------------------------------------------------------------------------


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (cuDNN allows it for convolutions by default): the
    fp32 parity check compares fp32 arithmetic, not TF32's 10-bit mantissas."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_model(
    device: torch.device, dtype: torch.dtype | None, sizes: Sizes, anchor_tflops: float
) -> tuple[torch.nn.Module, ASTConfig, dict[int, float], bool]:
    """Parity, then the batch sweep. Returns our model (on the device), its config, our
    clips/s (pipeline precision, autocast) by batch, and whether parity held."""
    print("\n1. AST-base forward: ours vs transformers' ASTForAudioClassification")
    reference, loaded = reference_and_ours()
    ours, config = loaded.model.to(device), loaded.config
    reference.to(device)
    flops = forward_flops(config)
    anchor_rate = anchor_tflops * 1e12 / flops
    print(
        f"  {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters; FLOP per clip "
        f"(2 x multiply-adds: patch embedding + {config.num_hidden_layers} layers of QKV/output "
        f"projections, MLP and attention over {config.num_patches + 2} tokens): "
        f"{flops / 1e9:.1f} GFLOP"
    )
    print(
        f"  anchor: {anchor_tflops:.0f} TFLOP/s -> {anchor_rate:,.0f} clips/s; "
        f"transformers attention: {getattr(reference.config, '_attn_implementation', '?')}"
    )

    features = synthetic_features(sizes.parity_batch, FbankConfig.for_model(config)).to(device)
    with strict_fp32():
        logits_diff, embedding_diff = output_differences(ours, reference, features)
    ok = max(logits_diff, embedding_diff) <= TOLERANCE
    print(
        f"  fp32 parity on {device.type}, {sizes.parity_batch} clips of synthetic sounds: "
        f"max |ours - transformers| logits {logits_diff:.2e}, embedding {embedding_diff:.2e} "
        f"(<= {TOLERANCE:g}): {VERDICTS[ok]}",
        flush=True,
    )

    variants = {f"ours, {precision_name(dtype)}": (ours, dtype)}
    if dtype is not None:
        # Weights cast once instead of per forward by autocast; the model casts its fp32 input.
        variants["ours, bf16 weights"] = (copy.deepcopy(ours).to(dtype), None)
    variants[f"transformers, {precision_name(dtype)}"] = (reference, dtype)
    print(f"  {'':32s} {'batch':>5s} {'clips/s':>9s} {'TFLOP/s':>8s} {'of anchor':>9s}")
    sweep: dict[str, dict[int, float]] = {name: {} for name in variants}
    sync = device_sync(device)
    for name, (model, autocast_dtype) in variants.items():
        for batch in sizes.model_batches:
            inputs = torch.randn(batch, config.max_length, config.num_mel_bins, device=device)
            try:
                seconds = best_seconds(
                    forward_under(model, inputs, autocast_dtype), sizes.repeats, sync
                )
            except torch.cuda.OutOfMemoryError:
                print(f"  {name:32s} {batch:5d}   out of memory")
                torch.cuda.empty_cache()
                continue
            rate = sweep[name][batch] = batch / seconds
            tflops = rate * flops / 1e12
            print(
                f"  {name:32s} {batch:5d} {rate:9.2f} {tflops:8.2f} {tflops / anchor_tflops:9.1%}",
                flush=True,
            )
        del inputs
    best = {
        name: max(rates.items(), key=lambda item: item[1]) for name, rates in sweep.items() if rates
    }
    ours_name, hf_name = next(iter(variants)), f"transformers, {precision_name(dtype)}"
    if best:
        fastest = max(best, key=lambda name: best[name][1])
        batch, rate = best[fastest]
        print(
            f"  fastest: {fastest}, batch {batch}: {rate:,.1f} clips/s, "
            f"{rate * flops / 1e12:.1f} TFLOP/s = {rate / anchor_rate:.1%} of the anchor"
        )
    if ours_name in best and hf_name in best:
        print(
            f"  ours / transformers (best batch each, {precision_name(dtype)}): "
            f"{best[ours_name][1] / best[hf_name][1]:.2f}x"
        )
    return ours, config, sweep[ours_name], ok


def check_compile(
    device: torch.device, dtype: torch.dtype | None, batch: int, eager_rate: float, budget_s: float
) -> None:
    """torch.compile of our model at one batch, in a child process killed after `budget_s`."""
    command = [sys.executable, __file__, "--device", device.type, "--compile-child", str(batch)]
    command += ["--precision", "bf16" if dtype is not None else "fp32"]
    # Its own session: on timeout the whole group goes, inductor's compile workers included.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            print(f"  torch.compile: no result within {budget_s:.0f} s (--compile-budget-s)")
            return
    lines = stdout.strip().splitlines()
    if child.returncode != 0 or not lines or not lines[-1].startswith("{"):
        problem = (stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        print(f"  torch.compile failed: {problem}")
        return
    result = json.loads(lines[-1])
    print(
        f"  torch.compile (default mode), batch {batch}: {result['clips_per_s']:,.1f} clips/s "
        f"({result['clips_per_s'] / eager_rate:.2f}x eager), "
        f"compiled in {result['compile_s']:.0f} s"
    )


def compile_child(device: torch.device, dtype: torch.dtype | None, batch: int) -> None:
    """The --compile-child process: prints one JSON line, {compile_s, clips_per_s}."""
    model = audioset_base().to(device)
    compiled = torch.compile(model)
    config = model.config
    inputs = torch.randn(batch, config.max_length, config.num_mel_bins, device=device)
    run, sync = forward_under(compiled, inputs, dtype), device_sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        run()
        sync()
    compile_s = time.perf_counter() - start
    seconds = best_seconds(run, 10, sync)
    print(json.dumps({"compile_s": compile_s, "clips_per_s": batch / seconds}))


# -- 2. fbank ------------------------------------------------------------------------------------


def check_fbank(device: torch.device, sizes: Sizes) -> bool | None:
    """CPU and CUDA rates and their max difference; None when there is no GPU to compare."""
    count, batch = sizes.fbank_clips, sizes.fbank_batch
    print(f"\n2. fbank (compute_fbank), {count} clips of {CLIP_S:g} s in batches of {batch}")
    config = FbankConfig()
    waveforms = torch.from_numpy(make_clips(count, CLIP_S))  # (B, N)
    lengths = torch.full((count,), waveforms.shape[1])
    on_cpu = batched_fbank(waveforms, lengths, batch, config)
    repeats = max(3, sizes.repeats // 2)
    rates = {
        f"CPU, {torch.get_num_threads()} threads": count
        / best_seconds(lambda: batched_fbank(waveforms, lengths, batch, config), repeats)
    }
    ok, verdict = None, "CUDA: no GPU, skipped"
    if device.type == "cuda":
        sync = device_sync(device)
        on_device = waveforms.to(device), lengths.to(device)
        rates["CUDA, audio already on the GPU"] = count / best_seconds(
            lambda: batched_fbank(*on_device, batch, config), repeats, sync
        )
        rates["CUDA, incl. host->device copy"] = count / best_seconds(
            lambda: batched_fbank(waveforms.to(device), lengths.to(device), batch, config),
            repeats,
            sync,
        )
        difference = (batched_fbank(*on_device, batch, config).cpu() - on_cpu).abs().max().item()
        ok = difference <= TOLERANCE
        verdict = f"max |CUDA - CPU| = {difference:.2e} (<= {TOLERANCE:g}): {VERDICTS[ok]}"
    cpu_rate = next(iter(rates.values()))
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:10.1f} clips/s  {rate / cpu_rate:5.1f}x CPU")
    print(f"  {verdict}")
    return ok


# -- 3. end to end -------------------------------------------------------------------------------


def pick_codec() -> Codec:
    """FLAC through the pipeline's own decoder when soundfile works, else WAV through `wave`."""
    try:
        import soundfile

        from pipeline.audio import decode_audio
    except (ImportError, OSError) as error:
        return Codec(
            f"stdlib wave on 16-bit WAV (pipeline.audio unavailable: {error})",
            encode_wav,
            decode_wav,
        )

    def encode_flac(clip: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, clip, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()

    return Codec(
        f"pipeline.audio.decode_audio on 16-bit FLAC (libsndfile "
        f"{soundfile.__libsndfile_version__})",
        encode_flac,
        lambda data: decode_audio(data, "flac", max_duration_s=3600.0).waveform,
    )


def encode_wav(clip: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(clip, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def decode_wav(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


@dataclass
class LoopSeconds:
    """Where the end-to-end loop's time went: the main thread's three parts, and the decode
    threads' CPU time (which overlaps them)."""

    wall: float = 0.0
    waiting_for_audio: float = 0.0
    fbank: float = 0.0  # pad, host->device copy, fbank
    model: float = 0.0  # forward, scores, results back on the host
    decode_cpu: float = 0.0


def labeling_loop(
    encoded: list[bytes],
    codec: Codec,
    model: torch.nn.Module,
    config: ASTConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    batch: int,
    workers: int,
) -> LoopSeconds:
    """The pipeline's per-clip work in one process: decode (thread pool, running ahead) ->
    fbank on the device -> model -> scores and embeddings back on the host."""
    fbank_config, sync = FbankConfig.for_model(config), device_sync(device)
    seconds = LoopSeconds()

    def decode(data: bytes) -> tuple[np.ndarray, float]:
        start = time.thread_time()
        return codec.decode(data), time.thread_time() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool, torch.inference_mode():
        decoded = pool.map(decode, encoded)
        for _ in range(0, len(encoded), batch):
            t0 = time.perf_counter()
            clips = list(itertools.islice(decoded, batch))
            t1 = time.perf_counter()
            waveforms, lengths = pad_waveforms([clip for clip, _ in clips])  # (B, N), (B,)
            features = compute_fbank(waveforms.to(device), lengths.to(device), fbank_config)
            sync()
            t2 = time.perf_counter()
            output = forward_under(model, features, dtype)()
            scores_from_logits(output.logits, config.multi_label).cpu()
            output.embedding.cpu()
            t3 = time.perf_counter()
            seconds.waiting_for_audio += t1 - t0
            seconds.fbank += t2 - t1
            seconds.model += t3 - t2
            seconds.decode_cpu += sum(cost for _, cost in clips)
    seconds.wall = time.perf_counter() - start
    return seconds


def check_end_to_end(
    model: torch.nn.Module,
    config: ASTConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    sizes: Sizes,
    codec: Codec,
    workers: int,
    model_rates: dict[int, float],
) -> None:
    count, batch = sizes.e2e_clips, sizes.e2e_batch
    print(
        f"\n3. end to end in one process (no Ray): {count} clips of {CLIP_S:g} s, decode on "
        f"{workers} CPU threads, fbank and model on {device.type}, batch {batch}, "
        f"{precision_name(dtype)}"
    )
    distinct = [codec.encode(clip) for clip in make_clips(min(count, DISTINCT_CLIPS), CLIP_S)]
    encoded = [distinct[i % len(distinct)] for i in range(count)]
    args = (codec, model, config, device, dtype, batch, workers)
    labeling_loop(encoded[:batch], *args)  # warm-up at this batch: cuFFT plans, kernels
    seconds = labeling_loop(encoded, *args)
    rate = count / seconds.wall
    print(f"  end to end: {rate:,.1f} clips/s ({seconds.wall:.2f} s)")
    parts = {
        "decode (waiting for the CPU threads)": seconds.waiting_for_audio,
        "fbank (pad, host->device copy, fbank)": seconds.fbank,
        "model (forward, results to the host)": seconds.model,
    }
    print("  main thread's time:")
    for name, part in parts.items():
        print(f"    {name:40s} {part:7.2f} s  {part / seconds.wall:4.0%}")
    decode_ms = seconds.decode_cpu / count * 1000
    print(
        f"  decode: {decode_ms:.2f} ms CPU per clip -> at most "
        f"{workers / (decode_ms / 1000):,.0f} clips/s on {workers} threads"
    )
    if batch in model_rates:
        print(f"  model alone at batch {batch} (section 1): {model_rates[batch]:,.1f} clips/s")
    bound = max(parts, key=parts.get)
    print(f"  bound by: {bound}")


if __name__ == "__main__":
    main()
