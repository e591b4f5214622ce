"""Large-codebook quantizers behind one contract, and the shared chunked nearest-code search."""

from snce.quantize.search import METRICS, code_blocks, nearest_code, nearest_codes

__all__ = ["METRICS", "code_blocks", "nearest_code", "nearest_codes"]
