"""Ahead-of-time compile of every kernel for an H100 (sm_90) without a GPU (Triton's bundled ptxas).

Catches what the interpreter cannot: code that does not lower to PTX, tile configs that need more shared
memory than an H100 has. Slow (a minute of compiling): ``pytest -m slow tests/kernels/test_compile_sm90.py``.
The compile runs in a subprocess because the test session may have set TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 227 * 1024  # max dynamic shared memory per block on sm_90


@pytest.mark.slow
def test_kernels_compile_for_sm90_within_shared_memory():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    for r in results:
        assert r["shared"] <= H100_SHARED_BYTES, r


def _compile_all() -> list[dict]:
    """Compile the loss kernels (default KernelConfig, bf16, both metrics paths) and the search kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from snce.losses.kernels import linear_snce, search
    from snce.losses.kernels.linear_snce import KernelConfig

    def compile_one(fn, types, constexprs, num_warps, num_stages, aligned):
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            signature[name] = "constexpr" if name in constexprs else types[name]
            if name not in constexprs and (types[name].startswith("*") or name in aligned):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as a launch with 16-aligned tensors and sizes
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        return dict(kernel=fn.__name__, shared=kernel.metadata.shared, **{k: str(v) for k, v in constexprs.items()})

    cfg = KernelConfig()
    types = dict(
        x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", z_ptr="*bf16", e_ptr="*bf16", target_ptr="*i64",
        row_scale_ptr="*fp32", code_term_ptr="*fp32", lse_l_ptr="*fp32", lse_t_ptr="*fp32", qdotl_ptr="*fp32",
        grad_row_ptr="*fp32", dl_ptr="*bf16", dx_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", N="i32", K="i32",
        H="i32", D="i32", inv_tau="fp32", ignore_index="i32", blocks_per_split="i32", code_start="i32",
        chunk_codes="i32", dl_stride="i32", filter_eps="fp32",
    )
    aligned = {"N", "K", "H", "code_start", "chunk_codes", "dl_stride", "blocks_per_split"}
    results = []
    for metric, has_bias, z_from_codes, block_d in (("l2", False, False, 64), ("cosine", True, True, 16)):
        meta = dict(
            HAS_BIAS=has_bias, Z_FROM_CODES=z_from_codes, METRIC=metric, STUDENT_PRECISION="tf32",
            TEACHER_PRECISION="native", BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h,
            BLOCK_D=block_d,
        )
        grouped = dict(meta, GROUP_N=cfg.group_n)
        for fn, constexprs in (
            (linear_snce._linear_snce_fwd_kernel, meta),
            (linear_snce._dlogits_kernel, grouped),
            (linear_snce._atomic_backward_kernel, dict(grouped, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=has_bias)),
        ):
            results.append(compile_one(fn, types, constexprs, cfg.num_warps, cfg.num_stages, aligned))
    search_types = dict(
        z_ptr="*fp32", e_ptr="*fp32", row_scale_ptr="*fp32", code_term_ptr="*fp32", out_score_ptr="*fp32",
        out_index_ptr="*i64", out_lse_ptr="*fp32", N="i32", K="i32", D="i32", blocks_per_split="i32", inv_tau="fp32",
    )
    for metric, k_best, with_lse in (("l2", 1, False), ("cosine", 5, True), ("dot", 8, True)):
        for precision, dtype in (("ieee", "*fp32"), ("native", "*bf16")):
            types_here = dict(search_types, z_ptr=dtype, e_ptr=dtype)
            constexprs = dict(METRIC=metric, PRECISION=precision, K_BEST=k_best, K_SLOTS=triton.next_power_of_2(k_best),
                              WITH_LSE=with_lse, BLOCK_N=64, BLOCK_K=64, BLOCK_D=64)
            results.append(compile_one(search._nearest_codes_kernel, types_here, constexprs, 4, 3, aligned))
    return results


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
