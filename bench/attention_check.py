"""Dilated attention on a GPU: every available backend against the float64 dense reference.

Forward and backward, bf16 (and fp32 where the backend takes it), fresh random inputs for each case,
output poisoned before the run. Prints a table and writes JSON (device name and date included).

    python bench/attention_check.py --out bench/results/attention-check.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import torch

from samlight.modeling.attention_kernels import KERNELS
from samlight.modeling.dilated_attention import DilatedBranch, dilated_attention, reference_dilated_attention

CASES = [
    # (name, batch, heads, tokens, head_dim, branches)
    ("lightening_t-like", 2, 6, 4096, 64, ((256, 1), (1024, 4), (4096, 16))),
    ("two-lengths", 1, 8, 1024, 32, ((64, 1), (256, 2), (1024, 8))),
    ("dilated-only", 3, 4, 1024, 64, ((256, 4), (1024, 16))),
    ("global", 1, 4, 1024, 64, ((1024, 1),)),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(backend: str, dtype: torch.dtype, case, seed: int) -> dict:
    name, batch, heads, tokens, dim, spec = case
    branches = tuple(DilatedBranch(w, r) for w, r in spec)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad = (torch.randn(batch, heads, tokens, dim, device="cuda", generator=g) for _ in range(4))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference_dilated_attention(q64, k64, v64, branches)
    ref_grads = torch.autograd.grad((ref * grad.double()).sum(), (q64, k64, v64))
    row = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "case": name}
    with torch.no_grad():
        if backend == "triton":  # allocates its own output with torch.empty: hand it NaN-filled blocks
            poison = torch.full((64 << 20,), float("nan"), device="cuda")
            del poison
            result = dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), branches, backend=backend)
        else:
            result = torch.full((batch, heads, tokens, dim), float("nan"), device="cuda")
            dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), branches, backend=backend, out=result)
        row["all_written"] = bool(torch.isfinite(result).all())
        row["forward_rel_err"] = rel_err(result, ref.detach())
    if backend not in ("flash_attn", "triton"):  # inference-only backends
        qd, kd, vd = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = dilated_attention(qd, kd, vd, branches, backend=backend)
        grads = torch.autograd.grad((out.float() * grad).sum(), (qd, kd, vd))
        row["backward_rel_err"] = max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    tol = 1e-2 if dtype != torch.float32 else 1e-3
    errors = [row["forward_rel_err"], row.get("backward_rel_err", 0.0)]
    row["tolerance"] = tol
    row["pass"] = row["all_written"] and all(e < tol for e in errors)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/attention-check.json")
    args = parser.parse_args()
    rows = []
    probe = torch.zeros(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    for backend in ["auto", "triton", *KERNELS]:
        for dtype in (torch.bfloat16, torch.float32):
            kernel = KERNELS.get(backend)
            if kernel is not None and not kernel.supports(probe.to(dtype)):
                rows.append({"backend": backend, "dtype": str(dtype).removeprefix("torch."), "skipped": "not available"})
                continue
            for i, case in enumerate(CASES):
                try:
                    rows.append(check(backend, dtype, case, seed=1000 + i))
                except Exception as error:  # record and go on: one backend must not hide the others
                    rows.append({"backend": backend, "dtype": str(dtype), "case": case[0], "error": repr(error)[:300],
                                 "pass": False})
    print(f"{'backend':<12}{'dtype':<10}{'case':<20}{'fwd err':>10}{'bwd err':>10}{'written':>9}{'pass':>6}")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['backend']:<12}{r['dtype']:<10}{r.get('case', ''):<20} {r.get('skipped') or r.get('error')}")
            continue
        bwd = r.get("backward_rel_err")
        print(f"{r['backend']:<12}{r['dtype']:<10}{r['case']:<20}{r['forward_rel_err']:>10.2e}"
              f"{(f'{bwd:.2e}' if bwd is not None else '-'):>10}{str(r['all_written']):>9}{str(r['pass']):>6}")
    payload = {
        "kind": "attention-check",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print("all pass:", all(r.get("pass", True) for r in rows))


if __name__ == "__main__":
    main()
