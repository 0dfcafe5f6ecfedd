"""Which layouts of out and do make the memory-efficient backward wrong? (Run on a GPU:
``PYTHONPATH=src python3 benchmarks/efficient_layout_probe.py``; benchmarks/RESULTS.md has
the answer: a row-major out, whatever the others.)"""

import sys

import torch

sys.path.insert(0, "tests")
from reference import reference_with_grads, rel_err
from tokenring.execution.kernels.cuda_sdpa import EfficientAttention

torch.manual_seed(0)
B, L, H, D = 2, 512, 8, 128


def rowmajor(x):
    return x.transpose(0, 1).contiguous().transpose(0, 1)


q, k, v, do = (torch.randn(B, L, H, D, device="cuda").bfloat16() for _ in range(4))
ref_out, ref_lse, ref_g = reference_with_grads(q, k, v, do, causal=False)
kern = EfficientAttention()
for qkv_rm in (False, True):
    qq, kk, vv = (rowmajor(t) if qkv_rm else t for t in (q, k, v))
    out, lse = kern.forward(qq, kk, vv, False, D**-0.5)
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    for out_rm in (False, True):
        for do_rm in (False, True):
            o = rowmajor(out) if out_rm else out.contiguous()
            d = rowmajor(do) if do_rm else do.contiguous()
            g = kern.backward(d, qq, kk, vv, o, lse, delta, False, D**-0.5)
            print(
                f"qkv_rowmajor={qkv_rm} out_rowmajor={out_rm} do_rowmajor={do_rm}:",
                " ".join(
                    f"{n}={rel_err(x, r):.3g}" for n, x, r in zip(("dq", "dk", "dv"), g, ref_g)
                ),
            )
