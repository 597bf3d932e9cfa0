"""The Triton kernels compile for a real GPU target (sm_90), even on a machine without one.

The interpreter (how the other kernel tests run on CPUs) is more permissive than the compiler:
it never type-checks loop-carried values, constexpr branches or dot operand types. Here each
kernel is compiled ahead of time to a cubin for an H100 with Triton's bundled LLVM and ptxas.
That runs in a subprocess, because TRITON_INTERPRET is read when a kernel is decorated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _compile(fn, types: dict[str, str], constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


def compile_all() -> None:
    """Compile the variants a GPU run uses: bf16 operands, every optional feature on and off."""
    from mrt_fast.kernels import logprobs_triton as L
    from mrt_fast.kernels import policy_loss_triton as P

    rows = P.policy_loss_rows_kernel
    types = {n: "*fp32" for n in rows.arg_names if n.endswith("_ptr")}
    types.update(dlogits_ptr="*bf16", targets_ptr="*i64", adv_index_ptr="*i64", stride_logits="i64",
                 stride_dlogits="i64", row_start="i64", V="i32", inv_temp="fp32", eps_low="fp32", eps_high="fp32",
                 dual_clip="fp32", beta="fp32", entropy_coef="fp32")
    for on in (True, False):
        _compile(rows, types, dict(HAS_ADV_INDEX=on, HAS_OLD=on, HAS_REF=on, HAS_DUAL=on, KL=3 if on else 1,
                                   WRITE_GRAD=on, BLOCK_V=2048))
    for fn in (L.logprobs_fwd_kernel, L.logprobs_bwd_dh_kernel, L.logprobs_bwd_dw_kernel):
        types = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        types.update({n: "i64" for n in fn.arg_names if n.startswith("stride")})
        types.update(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", tgt_ptr="*i64", N="i32", V="i32", H="i32",
                     inv_temp="fp32")
        _compile(fn, types, dict(HAS_BIAS=True, BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, UPCAST=False,
                                 DOT_PRECISION="tf32"))


@pytest.mark.skipif(not PTXAS.exists(), reason="triton's bundled ptxas (NVIDIA backend) is not available")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


if __name__ == "__main__":
    compile_all()
