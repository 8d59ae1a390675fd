"""The digits CNN of benchmarks/bench_quantize.py (sklearn's load_digits, trained in seconds),
shared by the prune and quantize tests."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from bench_quantize import BATCH, accuracy, digits_data, digits_model, train  # noqa: E402

__all__ = ["BATCH", "accuracy", "digits_data", "digits_model", "train"]
