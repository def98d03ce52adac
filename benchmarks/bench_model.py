"""Our AST forward vs transformers' ASTForAudioClassification at AST-base size (86 M parameters).

    .venv/bin/python benchmarks/bench_model.py [--batch 2] [--repeats 2] [--gpu-batch 64]
    .venv/bin/python benchmarks/bench_model.py --cpu-bf16 --threads 1,2 --repeats 1

CPU, fp32: both models hold the same weights (transformers saves, we load); outputs must agree
within 1e-4 (logits and pooled embeddings), then both forwards are timed (best of --repeats) and
the ratio printed. With CUDA: the same under bf16 autocast with a bigger batch, with the achieved
TFLOP/s of our forward.

--cpu-bf16 answers "should CPU-only runs use --precision bf16?": our AST-base forward in fp32 and
under CPU bf16 autocast, clips/s at each thread count and batch (--bf16-batches, default 2,4,8),
and the largest differences in logits, sigmoid scores and pooled embeddings on fbank of synthetic
sounds (tones, chords, chirps, beeps, clicks, noises, near-silence); then the same differences for
the bundled trained model (ast_model/default) on held-out synthetic clips, whose scores are far
from 0.5.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from timing import best_seconds, device_sync

from ast_model.checkpoint import LoadedModel, load_checkpoint
from ast_model.config import ASTConfig
from ast_model.features import FbankConfig, compute_fbank, pad_waveforms
from ast_model.labels import scores_from_logits
from ast_model.model import ASTForAudioClassification

AUDIOSET_LABELS = 527
SYNTHETIC_SEED = 1  # held out: the bundled model was trained on seed 0
# Instruction sets that give a CPU native bf16 arithmetic (Linux /proc/cpuinfo flag names).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")


def forward_flops(config: ASTConfig) -> float:
    """Multiply-adds x 2 of one clip's forward: patch projection, then per layer the four
    D x D projections, the MLP and the two L x L attention products."""
    length, width = config.num_patches + 2, config.hidden_size
    patches = 2 * config.num_patches * width * config.patch_size**2
    per_layer = 2 * length * (4 * width * width + 2 * width * config.intermediate_size)
    per_layer += 2 * 2 * length * length * width
    return patches + config.num_hidden_layers * per_layer


def audioset_base(seed: int = 0) -> ASTForAudioClassification:
    """Our AST-base with 527 labels, randomly initialised (the speed of a real checkpoint)."""
    torch.manual_seed(seed)
    config = ASTConfig(id2label=tuple(f"label {i}" for i in range(AUDIOSET_LABELS)))
    return ASTForAudioClassification(config).eval()


def reference_and_ours() -> tuple[torch.nn.Module, LoadedModel]:
    """transformers' AST-base (527 labels), randomly initialised with seed 0, and the same weights
    as ast_model loads them from the folder that transformers' save_pretrained wrote."""
    from transformers import ASTConfig as HFConfig
    from transformers import ASTForAudioClassification as HFModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar

    labels = {i: f"label {i}" for i in range(AUDIOSET_LABELS)}
    torch.manual_seed(0)
    reference = HFModel(
        HFConfig(id2label=labels, label2id={v: k for k, v in labels.items()})
    ).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        return reference, load_checkpoint(folder)


def output_differences(
    ours: torch.nn.Module, reference: torch.nn.Module, features: torch.Tensor
) -> tuple[float, float]:
    """max |ours - transformers| of (logits, pooled embedding) on the same features."""
    with torch.inference_mode():
        output = ours(features)
        expected = reference(features).logits
        expected_embedding = reference.audio_spectrogram_transformer(features).pooler_output
    logits_diff = (output.logits - expected).abs().max().item()
    embedding_diff = (output.embedding - expected_embedding).abs().max().item()
    return logits_diff, embedding_diff


def forward_under(
    model: torch.nn.Module, features: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[], object]:
    """model(features) under autocast to `dtype` on the features' device; None: plain fp32."""

    def run() -> object:
        with torch.autocast(
            features.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            return model(features)

    return run


def synthetic_features(count: int, fbank_config: FbankConfig) -> torch.Tensor:
    """(count, T, F) fbank of 10 s clips of the demo's synthetic sound classes, shuffled."""
    from pipeline.commands.synthetic import CLASS_NAMES, iter_dataset

    per_class = -(-count // len(CLASS_NAMES))
    clips = iter_dataset(per_class, SYNTHETIC_SEED, duration_s=10.0)
    waveforms, lengths = pad_waveforms([c.waveform for c in itertools.islice(clips, count)])
    with torch.inference_mode():
        return compute_fbank(waveforms, lengths, fbank_config)


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 instruction sets this CPU reports (Linux); empty when none or unknown."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def differences(fp32: object, bf16: object, multi_label: bool) -> dict[str, float]:
    """Largest bf16-vs-fp32 differences of two ASTOutputs, and how often the top label agrees."""
    scores32 = scores_from_logits(fp32.logits, multi_label)
    scores16 = scores_from_logits(bf16.logits, multi_label)
    top_agrees = scores32.argmax(dim=1) == scores16.argmax(dim=1)
    return {
        "logits": (fp32.logits - bf16.logits).abs().max().item(),
        "scores": (scores32 - scores16).abs().max().item(),
        "embedding": (fp32.embedding - bf16.embedding).abs().max().item(),
        "logit spread (std)": fp32.logits.std().item(),
        "top-1 agreement": top_agrees.float().mean().item(),
    }


def print_differences(title: str, diffs: dict[str, float]) -> None:
    print(f"  {title}:")
    for name, value in diffs.items():
        shown = f"{value:.1%}" if name == "top-1 agreement" else f"{value:.3g}"
        print(f"    {name:22s} {shown}")


def cpu_bf16_study(batches: Sequence[int], thread_counts: Sequence[int], repeats: int) -> None:
    """fp32 vs bf16 autocast on this CPU: AST-base speed and differences, then the bundled
    trained model's differences. Each forward is warmed up once per precision and thread count at
    the smallest batch, then timed (best of `repeats`)."""
    model = audioset_base()
    config = model.config
    features = synthetic_features(max(batches), FbankConfig.for_model(config))
    precisions = {"fp32": None, "bf16": torch.bfloat16}
    flags = cpu_bf16_flags()
    print(
        f"CPU bf16 study, AST-base ({forward_flops(config) / 1e9:.0f} GFLOP per clip), "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16: {', '.join(flags) or 'none (emulated)'}"
    )
    last: dict[str, object] = {}  # precision -> output of the largest batch, for the differences
    print(f"  threads batch {'fp32 clips/s':>13s} {'bf16 clips/s':>13s} bf16/fp32")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for dtype in precisions.values():
                forward_under(model, features[: min(batches)], dtype)()  # warm-up
        for batch in batches:
            rates = {}
            for precision, dtype in precisions.items():
                run = forward_under(model, features[:batch], dtype)

                def keep(run: Callable[[], object] = run, precision: str = precision) -> None:
                    last[precision] = run()

                rates[precision] = batch / best_seconds(keep, repeats, warmup=False)
            print(
                f"  {threads:7d} {batch:5d} {rates['fp32']:13.3f} {rates['bf16']:13.3f} "
                f"{rates['bf16'] / rates['fp32']:8.2f}x",
                flush=True,
            )
    print_differences(
        f"AST-base, random init, {max(batches)} clips, bf16 vs fp32 (sigmoid over 527 labels)",
        differences(last["fp32"], last["bf16"], multi_label=True),
    )
    trained = load_checkpoint("default")
    trained_features = synthetic_features(200, FbankConfig.for_model(trained.config))
    with torch.inference_mode():
        outputs = [forward_under(trained.model, trained_features, d)() for d in precisions.values()]
    print_differences(
        f"bundled trained model ({trained.config.num_labels} labels, "
        f"{'sigmoid' if trained.config.multi_label else 'softmax'}), 200 held-out clips",
        differences(*outputs, multi_label=trained.config.multi_label),
    )


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="CPU batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int_list,
        default=[],
        help="torch threads (default: torch's, all cores); --cpu-bf16 takes a list, e.g. 1,2",
    )
    parser.add_argument("--cpu-bf16", action="store_true", help="the CPU bf16 vs fp32 study")
    parser.add_argument("--bf16-batches", type=int_list, default=[2, 4, 8])
    args = parser.parse_args()
    if args.cpu_bf16:
        thread_counts = args.threads or [torch.get_num_threads()]
        cpu_bf16_study(args.bf16_batches, thread_counts, args.repeats)
        return
    if args.threads:
        torch.set_num_threads(args.threads[0])

    reference, loaded = reference_and_ours()
    ours, config = loaded.model, loaded.config
    print(
        f"AST-base: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters, "
        f"{config.num_patches + 2} tokens, {forward_flops(config) / 1e9:.0f} GFLOP per clip"
    )

    features = torch.randn(args.batch, config.max_length, config.num_mel_bins)
    logits_diff, embedding_diff = output_differences(ours, reference, features)
    print(
        f"CPU fp32 max |ours - transformers|: logits {logits_diff:.2e}, "
        f"embedding {embedding_diff:.2e}"
    )
    assert logits_diff <= 1e-4 and embedding_diff <= 1e-4, "outputs differ from transformers"

    print(
        f"CPU fp32, batch {args.batch}, {torch.get_num_threads()} threads, best of {args.repeats}:"
    )
    ours_s = best_seconds(lambda: ours(features), args.repeats)
    hf_s = best_seconds(lambda: reference(features), args.repeats)
    print(f"  ours         {ours_s / args.batch:7.3f} s/clip")
    print(f"  transformers {hf_s / args.batch:7.3f} s/clip   ours is {hf_s / ours_s:.2f}x as fast")

    if torch.cuda.is_available():
        ours.cuda()
        reference.cuda()
        features = torch.randn(
            args.gpu_batch, config.max_length, config.num_mel_bins, device="cuda"
        )
        print(f"{torch.cuda.get_device_name()}, bf16 autocast, batch {args.gpu_batch}:")
        repeats, sync = max(args.repeats, 5), device_sync("cuda")
        ours_s = best_seconds(forward_under(ours, features, torch.bfloat16), repeats, sync)
        hf_s = best_seconds(forward_under(reference, features, torch.bfloat16), repeats, sync)
        tflops = forward_flops(config) * args.gpu_batch / ours_s / 1e12
        print(f"  ours         {args.gpu_batch / ours_s:8.1f} clips/s  {tflops:6.1f} TFLOP/s")
        print(f"  transformers {args.gpu_batch / hf_s:8.1f} clips/s  ratio {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
