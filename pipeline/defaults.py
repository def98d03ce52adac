"""Every default of ast-label, written once: the CLI, the library and the jobs read them here."""

from __future__ import annotations

TOP_K = 5
MAX_DURATION_S = 3600.0  # longer files become error rows
MAX_MEMBER_BYTES = 2 * 1024**3  # bigger files or tar members become error rows
FILES_PER_UNIT = 256  # plain audio files grouped into one work unit (one output file)
GPU_BATCH_SIZE = 64  # windows per model batch on a GPU
CPU_BATCH_SIZE = 32  # windows per model batch on a CPU
CPUS_PER_CPU_CLASSIFIER = 8  # without GPUs: one classifier actor (of that many threads) per 8 CPUs
DEVICE = "auto"  # cuda when torch sees a GPU, else cpu
PRECISION = "auto"  # bf16 autocast on GPU, fp32 on CPU
META_DIR = ".ast-label"  # an output's hidden folder (all but the data); Parquet readers skip it
DEVICES = ("auto", "cpu", "cuda")  # --device choices
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # --precision choices
INSPECT_MIN_SCORE = 0.5  # `inspect --label`: the score a window must reach to count as a match
INSPECT_TOP = 20  # `inspect`: rows shown per table (0: all)

# Search (`similar`, `near-duplicates`).
SIMILAR_K = 20  # files `similar` lists
DUPLICATE_MIN_SIMILARITY = 0.98  # file similarity from which `near-duplicates` groups files
