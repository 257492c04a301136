"""``visionpe demo``: build every registered encoder in a small ViT, run it, and print a table.

For each encoder the demo builds ``vpe_vit_tiny_patch16_224`` (shrunk to a few blocks), runs a forward
pass at the training resolution and, with ``dynamic_img_size``, at a non-square resolution, and reports
the hooks used, the PE's parameter count, whether the SDPA fast path is used, and the forward time.
It is a smoke test a newcomer can read; the real diagnostic is ``visionpe threecell``.
"""
from __future__ import annotations

import argparse
import sys
import time


def run_one(name: str, img_size: int, other_size: tuple, depth: int, batch: int) -> dict:
    import timm
    import torch
    model = timm.create_model("vpe_vit_tiny_patch16_224", pretrained=False, pe=name, img_size=img_size,
                              depth=depth, num_classes=10, dynamic_img_size=True).eval()
    pe_params = sum(p.numel() for p in model.pe.parameters())
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        model(x)  # warm-up (caches tables)
        t0 = time.perf_counter()
        y = model(x)
        ms = (time.perf_counter() - t0) * 1000 / batch
        y2 = model(torch.randn(batch, 3, *other_size))
    ok = bool(torch.isfinite(y).all() and torch.isfinite(y2).all()) and y.shape == y2.shape == (batch, 10)
    return {"encoder": name, "hooks": ",".join(sorted(model.pe.hooks)) or "-", "pe_params": pe_params,
            "sdpa": "no" if model.pe.needs_attn_probs else "yes", "ms_per_img": ms,
            "other_res": "ok" if ok else "FAILED"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="visionpe demo", description=__doc__.split("\n\n")[0])
    from visionpe.cli_util import add_encoders_argument, check_encoders
    add_encoders_argument(p)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--other-size", type=int, nargs=2, default=(160, 288), metavar=("H", "W"),
                   help="second, non-square resolution to run at (dynamic_img_size)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    import visionpe
    from tqdm import tqdm
    names = check_encoders(args.encoders) if args.encoders else visionpe.list_encoders()
    rows = [run_one(n, args.img_size, tuple(args.other_size), args.depth, args.batch)
            for n in tqdm(names, desc="encoders", unit="enc")]
    print(f"\nViT-Ti/16, depth {args.depth}, forward at {args.img_size}x{args.img_size} "
          f"and {args.other_size[0]}x{args.other_size[1]} (dynamic_img_size)\n")
    hdr = ["encoder", "hooks", "PE params", "SDPA", f"ms/img @{args.img_size}", "other res"]
    table = [[r["encoder"], r["hooks"], f"{r['pe_params']:,}", r["sdpa"], f"{r['ms_per_img']:.1f}",
              r["other_res"]] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(hdr)]
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    return 0 if all(r["other_res"] == "ok" for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
