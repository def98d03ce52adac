"""Our AST forward vs transformers' ASTForAudioClassification at AST-base size (86 M parameters).

    .venv/bin/python benchmarks/bench_model.py [--batch 2] [--repeats 2] [--gpu-batch 64]

CPU, fp32: both models hold the same weights (transformers saves, we load); outputs must agree
within 1e-4 (logits and pooled embeddings), then both forwards are timed (best of --repeats) and
the ratio printed. With CUDA: the same under bf16 autocast with a bigger batch, with the achieved
TFLOP/s of our forward.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import torch
from timing import best_seconds

from ast_model.checkpoint import load_checkpoint
from ast_model.config import ASTConfig

AUDIOSET_LABELS = 527


def forward_flops(config: ASTConfig) -> float:
    """Multiply-adds x 2 of one clip's forward: patch projection, then per layer the four
    D x D projections, the MLP and the two L x L attention products."""
    length, width = config.num_patches + 2, config.hidden_size
    patches = 2 * config.num_patches * width * config.patch_size**2
    per_layer = 2 * length * (4 * width * width + 2 * width * config.intermediate_size)
    per_layer += 2 * 2 * length * length * width
    return patches + config.num_hidden_layers * per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="CPU batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import ASTConfig as HFConfig
    from transformers import ASTForAudioClassification as HFModel

    labels = {i: f"label {i}" for i in range(AUDIOSET_LABELS)}
    torch.manual_seed(0)
    reference = HFModel(
        HFConfig(id2label=labels, label2id={v: k for k, v in labels.items()})
    ).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        loaded = load_checkpoint(folder)
    ours, config = loaded.model, loaded.config
    print(
        f"AST-base: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters, "
        f"{config.num_patches + 2} tokens, {forward_flops(config) / 1e9:.0f} GFLOP per clip"
    )

    features = torch.randn(args.batch, config.max_length, config.num_mel_bins)
    with torch.inference_mode():
        output = ours(features)
        expected = reference(features).logits
        expected_embedding = reference.audio_spectrogram_transformer(features).pooler_output
    logits_diff = (output.logits - expected).abs().max().item()
    embedding_diff = (output.embedding - expected_embedding).abs().max().item()
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

        def autocast(model: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(features)

            return run

        print(f"{torch.cuda.get_device_name()}, bf16 autocast, batch {args.gpu_batch}:")
        repeats = max(args.repeats, 5)
        ours_s = best_seconds(autocast(ours), repeats, torch.cuda.synchronize)
        hf_s = best_seconds(autocast(reference), repeats, torch.cuda.synchronize)
        tflops = forward_flops(config) * args.gpu_batch / ours_s / 1e12
        print(f"  ours         {args.gpu_batch / ours_s:8.1f} clips/s  {tflops:6.1f} TFLOP/s")
        print(f"  transformers {args.gpu_batch / hf_s:8.1f} clips/s  ratio {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
