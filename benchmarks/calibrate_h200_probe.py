"""The planner's per-device data for one GPU, in one run (a device-tool call).

Measures the block-kernel table, merge rate and one-rank host time that
``src/tokenring/planner/data/h200-bf16.json`` holds, then checks the model's head
rule (a block of H heads costs what a query H/32 times as long costs at 32 heads)
on other head counts: measured against predicted time. Writes
``$OUT/h200-calibration.json`` (committed as ``benchmarks/runs/*-calibration.json``).

    PYTHONPATH=src python benchmarks/calibrate_h200_probe.py
"""

from __future__ import annotations

import json
import os
import time

import torch

from tokenring.options import Pass
from tokenring.planner.topology import block_flops
from tokenring_bench import calibrate as cal

HEAD_CHECKS = [
    (1024, 1024, False),
    (4096, 4096, False),
    (4096, 4096, True),
    (16384, 16384, True),
    (2048, 8192, False),
]


def main() -> None:
    device = torch.device("cuda")
    t0 = time.time()
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    kernel = cal.measure_kernels(device, torch.bfloat16, cal.GPU_LENGTHS)
    out["kernel_bf16"] = kernel.to_dict()
    out["merge_gbps"] = cal.measure_merge_gbps(device, torch.bfloat16)
    out["call_us"] = cal.measure_call_us(device, torch.bfloat16)
    timer = cal.call_timer(device)
    checks = []
    for heads in (8, 24, 64):
        for lq, lk, causal in HEAD_CHECKS:
            for p in Pass:
                cal.REF_HEADS = heads
                rate = cal._block_rate(p, lq, lk, causal, device, torch.bfloat16, timer, 5)
                cal.REF_HEADS = 32
                flops = block_flops(p, lq, lk, causal, heads, 128)
                checks.append(
                    {
                        "heads": heads,
                        "lq": lq,
                        "lk": lk,
                        "causal": causal,
                        "pass_": p.value,
                        "measured_tflops": rate,
                        "measured_ms": flops / rate / 1e9,
                        "model_ms": kernel.seconds(p, lq, lk, causal, heads, 128) * 1e3,
                    }
                )
                print(checks[-1], flush=True)
    out["head_checks"] = checks
    out["seconds"] = time.time() - t0
    with open(os.path.join(os.environ["OUT"], "h200-calibration.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("done", out["seconds"])


if __name__ == "__main__":
    main()
