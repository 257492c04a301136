"""``visionpe bench``: speed and memory of every encoder in a ViT-S/16, as ratios against learned APE.

Protocol (CPU by default):

* every registered encoder is built in ``vpe_vit_small_patch16_<res>`` (``img_size=res``), plus timm's own
  ``vit_small_patch16_rope_mixed_224`` (built at ``img_size=res``) as an outside anchor row;
* models are timed **interleaved, round-robin** (one batch per model per round, ``--rounds`` rounds) so
  that machine noise hits every row alike; the figure is the median ms per image;
* modes: ``fwd`` (eval, ``inference_mode``) and ``fwdbwd`` (train mode, forward + backward of the sum of
  logits), batch 8, at 224 and 384;
* peak memory: each (model, resolution) runs once more in a fresh subprocess that records the peak
  resident-set growth over the built model during a forward and during a forward+backward (CPU), or
  ``torch.cuda.max_memory_allocated`` on CUDA;
* every figure is also reported as a ratio to the learned-APE row measured in the same run.

Results go to ``benchmarks/results/<tag>.json`` and ``benchmarks/results/<tag>.md``.
``visionpe bench vlm`` dispatches to the VLM position benchmark (``visionpe.eval.bench_vlm``);
``visionpe bench sweep`` to the resolution sweep, 224 to 1024 px, SDPA and flex paths (``visionpe.eval.bench_sweep``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


BASELINE = "learned"
ANCHOR = "timm:vit_small_patch16_rope_mixed_224"


def build_model(name: str, res: int):
    import timm
    import visionpe  # noqa: F401  (registers vpe_vit_*)
    if name.startswith("timm:"):
        return timm.create_model(name[5:], pretrained=False, img_size=res)
    return timm.create_model(f"vpe_vit_small_patch16_{res}", pretrained=False, pe=name, img_size=res)


def _step(model, x, mode: str):
    import torch
    if mode == "fwd":
        with torch.inference_mode():
            model(x)
    else:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_models(names, res: int, mode: str, batch: int, rounds: int, warmup: int, device, dtype,
                progress=None) -> dict:
    """Median ms/img per model, timed round-robin. Returns ``{name: {"ms_per_img", "samples"}}``."""
    import torch
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    models = {}
    for n in names:
        m = build_model(n, res).to(device=device, dtype=dtype)
        m.train(mode == "fwdbwd")
        models[n] = m
    for _ in range(warmup):
        for m in models.values():
            _step(m, x, mode)
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            _step(models[n], x, mode)
            _sync(device)
            samples[n].append((time.perf_counter() - t0) * 1000 / batch)
        if progress is not None:
            progress.update(1)
    return {n: {"ms_per_img": statistics.median(s), "samples": s} for n, s in samples.items()}


_MEM_SCRIPT = r"""
import json, sys, torch
from visionpe.eval.bench import build_model, _step
name, res, batch, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
device = torch.device(dev)
m = build_model(name, res).to(device)
x = torch.randn(batch, 3, res, res, device=device)
def status_mib(field):
    # VmHWM is the peak RSS of this process's own address space; ru_maxrss is not usable here because a
    # child started by fork+exec inherits the parent's high-water mark (a big parent hides the child)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field + " not in /proc/self/status")
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
out = {}
if device.type == "cuda":
    for mode in ("fwd", "fwdbwd"):
        m.train(mode == "fwdbwd"); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        _step(m, x, mode); torch.cuda.synchronize()
        out[mode] = (torch.cuda.max_memory_allocated() - base) / 2**20
else:
    for mode in ("fwd", "fwdbwd"):
        m.train(mode == "fwdbwd"); m.zero_grad(set_to_none=True)
        reset_peak(); base = status_mib("VmRSS")
        _step(m, x, mode)
        out[mode] = status_mib("VmHWM") - base
print(json.dumps(out))
"""


def measure_memory(name: str, res: int, batch: int, device: str) -> dict:
    """Peak memory growth (MiB) in a fresh process: forward (eval) and forward+backward (train)."""
    import torch
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
    proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, name, str(res), str(batch), device],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name}@{res} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_ratio(v, base):
    return f"{v / base:.3f}x" if base else "-"


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# visionpe bench: ViT-S/16, batch {meta['batch']}, {meta['device']} ({meta['dtype']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, timm {meta['timm']}; threads {meta['threads']}; "
             f"{meta['rounds']} interleaved rounds, median ms/img. Ratios are against `{BASELINE}` (learned APE) "
             f"measured in the same run; `{ANCHOR}` is timm's own RoPE-Mixed ViT-S as an outside anchor.", ""]
    ress = meta["resolutions"]
    hdr = ["encoder", "hooks"]
    for r in ress:
        hdr += [f"fwd {r} ms", f"fwd {r} ratio", f"fwd+bwd {r} ms", f"fwd+bwd {r} ratio"]
    if result.get("memory"):
        for r in ress:
            hdr += [f"peak mem fwd+bwd {r} MiB (ratio)"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for name in result["names"]:
        row = [f"`{name}`", result["hooks"].get(name, "-")]
        for r in ress:
            for mode in ("fwd", "fwdbwd"):
                if mode not in result["modes"]:
                    row += ["-", "-"]
                    continue
                t = result["timing"][str(r)][mode]
                v, b = t[name]["ms_per_img"], t[BASELINE]["ms_per_img"]
                row += [f"{v:.1f}", _fmt_ratio(v, b)]
        if result.get("memory"):
            for r in ress:
                mem = result["memory"].get(str(r), {})
                if name in mem:
                    v, b = mem[name]["fwdbwd"], mem[BASELINE]["fwdbwd"]
                    row += [f"{v:.0f} ({_fmt_ratio(v, b)})"]
                else:
                    row += ["-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="visionpe bench", description=__doc__.split("\n\n")[0])
    from visionpe.cli_util import add_encoders_argument
    add_encoders_argument(p)
    p.add_argument("--resolutions", nargs="*", type=int, default=[224, 384])
    p.add_argument("--modes", nargs="*", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median over rounds)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-anchor", action="store_true", help="skip timm's RoPE-Mixed anchor row")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--tag", default=None, help="file stem (default: vit_s16_<device>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vlm":
        from visionpe.eval import bench_vlm
        return bench_vlm.main(argv[1:])
    if argv and argv[0] == "sweep":
        from visionpe.eval import bench_sweep
        return bench_sweep.main(argv[1:])
    args = parse_args(argv)
    import torch
    import timm
    from tqdm import tqdm
    import visionpe
    if args.threads:
        torch.set_num_threads(args.threads)
    from visionpe.cli_util import check_encoders
    names = check_encoders(args.encoders) if args.encoders else visionpe.list_encoders()
    names = [BASELINE] + [n for n in names if n != BASELINE]
    if not args.no_anchor:
        names.append(ANCHOR)
    if any(r % 16 for r in args.resolutions):
        raise ValueError(f"--resolutions must be multiples of the patch size 16; got {args.resolutions}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    result = {
        "meta": {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
                 "device": str(device), "dtype": args.dtype, "batch": args.batch, "rounds": args.rounds,
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
                 "resolutions": args.resolutions, "date": time.strftime("%Y-%m-%d %H:%M")},
        "names": names, "modes": args.modes,
        "hooks": {n: ",".join(visionpe.encoder_info(n).hooks) or "-" for n in names if not n.startswith("timm:")},
        "timing": {}, "memory": {},
    }
    total = len(args.resolutions) * len(args.modes) * args.rounds
    with tqdm(total=total, desc="timing", unit="round") as bar:
        for res in args.resolutions:
            result["timing"][str(res)] = {}
            for mode in args.modes:
                bar.set_postfix_str(f"{mode}@{res}")
                result["timing"][str(res)][mode] = time_models(names, res, mode, args.batch, args.rounds,
                                                               args.warmup, device, dtype, progress=bar)
    if not args.no_memory:
        jobs = [(n, r) for r in args.resolutions for n in names]
        for n, r in tqdm(jobs, desc="peak memory", unit="model"):
            result["memory"].setdefault(str(r), {})[n] = measure_memory(n, r, args.batch, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"vit_s16_{device.type}"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (out / f"{tag}.md").write_text(md)
    print(md)
    print(f"wrote {out / (tag + '.json')} and {out / (tag + '.md')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
