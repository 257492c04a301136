"""PESI: the position-encoding spatial-information metrics of LOOPE (§3.3; spec loope_threecell.md §9).

For a patch grid ``(h, w)`` and a similarity ``E(c, p)`` between the position of a centre cell ``c`` and
every cell ``p`` (the centre included, ``E(c, c) = 1``), with ``d`` the Euclidean cell distance:

* ``M_U`` (undirected monotonicity): bin cells by ``r = round(d)``, take the mean ``mu(r)`` per bin, and
  the Spearman correlation ``rho`` between the bin radii and ``mu(r)``; ``M_U = mean_c (1 - rho)``
  (ideal 2: similarity falls monotonically with distance).
* ``M_D`` (directed monotonicity): bucket cells by ``theta = atan2(col offset, row offset)`` into
  ``N`` buckets of ``2 pi / N`` (floor; the centre falls in bucket 0); per bucket with >= 2 cells the
  Spearman correlation between ``d`` and the cell similarities (no radial averaging), 0 for the other
  buckets; ``M_D = mean_c (1 - mean over all N buckets)``. The paper's Table 5 uses ``N = 60``.
* ``A_SU`` (undirected asymmetry): per radius bin the coefficient of variation ``sigma(r) / mu(r)``
  (population std); mean over the bins of a centre, then over centres (0 = symmetric).

Spearman uses average ranks for ties (similarities are rounded to 1e-10 first, so that values equal in
exact arithmetic tie instead of being ordered by float noise); a correlation with a constant side is undefined and counted as 0
(this never happens for a non-degenerate PE on the paper's grids).

Where ``E`` comes from (:func:`position_similarity`):

* **additive encoders** (``embed`` hook on the input tokens): the table the encoder adds to all-zero
  tokens, patch rows only, and ``E`` = cosine similarity of its rows (the paper's definition);
* **rotary encoders** (``rotate``): identical content ``q = k = 1`` at every position is rotated by the
  encoder with the model's settings, and ``E(c, p) = <q_c', k_p'> / (|q_c'| |k_p'|)``, the attention-logit
  kernel over offsets normalised like a cosine. For a rotation with angles ``theta_f * pos`` this is
  ``mean_f cos(theta_f (pos_p - pos_c))``, exactly the cosine similarity of the matching sinusoidal
  table, so rotary and sinusoidal rows are comparable;
* **bias encoders** (``bias``): the additive logit bias ``b`` with the same identical content, turned into
  the softmax kernel normalised at the centre, ``E(c, p) = exp(b(c, p) - (b(c, c) + b(p, p)) / 2)``;
* rotate and bias together multiply the two; every kernel is averaged over heads and blocks;
* encoders without a content-independent position signal (``none``, or CPE/PEG, whose zero-input
  table is constant) give NaN metrics.
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np


__all__ = ["pesi_from_similarity", "cosine_similarity_matrix", "position_similarity",
           "model_pesi", "plot_similarity", "main"]


# -- metrics -----------------------------------------------------------------------------------------
def _group_ranks(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Average ranks (0-based) of ``values`` within each group id of ``groups`` (1D, same length)."""
    order = np.lexsort((values, groups))
    g, v = groups[order], values[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    start = np.maximum.accumulate(np.where(new_group, np.arange(g.size), 0))
    pos = np.arange(g.size) - start  # rank within the group, ignoring ties
    new_tie = new_group | np.r_[True, v[1:] != v[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    mean_pos = np.bincount(tie_id, weights=pos) / np.bincount(tie_id)
    ranks = np.empty(g.size)
    ranks[order] = mean_pos[tie_id]
    return ranks


def _group_spearman(groups: np.ndarray, a: np.ndarray, b: np.ndarray, num_groups: int) -> np.ndarray:
    """Spearman correlation of ``a`` and ``b`` inside each group ``0..num_groups-1``.

    Groups with fewer than 2 members or a constant side get 0. Returns ``(num_groups,)``.
    """
    ra, rb = _group_ranks(groups, a), _group_ranks(groups, b)
    cnt = np.bincount(groups, minlength=num_groups).astype(np.float64)
    safe = np.maximum(cnt, 1)
    ma = np.bincount(groups, ra, num_groups) / safe
    mb = np.bincount(groups, rb, num_groups) / safe
    da, db = ra - ma[groups], rb - mb[groups]
    cov = np.bincount(groups, da * db, num_groups)
    va = np.bincount(groups, da * da, num_groups)
    vb = np.bincount(groups, db * db, num_groups)
    den = np.sqrt(va * vb)
    ok = (cnt >= 2) & (den > 1e-12 * np.maximum(cnt, 1) ** 2)
    rho = np.zeros(num_groups)
    rho[ok] = cov[ok] / den[ok]
    return rho


_RANK_DECIMALS = 10


def pesi_from_similarity(sim, grid, num_buckets: int = 60) -> dict[str, float]:
    """``M_U``, ``M_D`` and ``A_SU`` of a patch-similarity matrix.

    Args:
        sim: ``(N, N)`` with ``N = h * w`` (row-major cells); ``sim[c, p]`` is ``E(c, p)``.
        grid: ``(h, w)``.
        num_buckets: direction buckets of ``M_D`` (60 = 6 degrees in the paper).
    """
    import torch
    from visionpe.layout import as_grid
    h, w = as_grid(grid, "grid", ndim=(2,))
    sim = np.asarray(sim.detach().cpu() if isinstance(sim, torch.Tensor) else sim, dtype=np.float64)
    n = h * w
    if sim.shape != (n, n):
        raise ValueError(f"sim must be (h*w, h*w) = ({n}, {n}) for grid {(h, w)}; got {sim.shape}")
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an int >= 1; got {num_buckets!r}")
    if not np.isfinite(sim).all():
        return {"M_U": math.nan, "M_D": math.nan, "A_SU": math.nan}
    rows, cols = np.divmod(np.arange(n), w)
    dr = rows[None, :] - rows[:, None]  # (centre, cell) row offset
    dc = cols[None, :] - cols[:, None]
    d2 = dr * dr + dc * dc
    centre = np.repeat(np.arange(n), n)
    # ranks must see mathematically equal similarities (mirror cells of a symmetric PE) as ties, not as an
    # order decided by float rounding noise: round to 1e-10 first
    e = np.round(sim.reshape(-1), _RANK_DECIMALS)

    # undirected: radius bins r = round(d) per centre (no exact .5 ties exist for integer offsets)
    r = np.rint(np.sqrt(d2)).astype(np.int64).reshape(-1)
    nr = int(r.max()) + 1
    bin_id = centre * nr + r
    cnt = np.bincount(bin_id, minlength=n * nr)
    present = cnt > 0
    s1 = np.bincount(bin_id, e, n * nr)
    s2 = np.bincount(bin_id, e * e, n * nr)
    mu = s1[present] / cnt[present]
    var = np.maximum(s2[present] / cnt[present] - mu * mu, 0.0)
    bin_centre = np.nonzero(present)[0] // nr
    bin_r = np.nonzero(present)[0] % nr
    rho_u = _group_spearman(bin_centre, bin_r.astype(np.float64), np.round(mu, _RANK_DECIMALS), n)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.sqrt(var) / mu
    a_prime = np.bincount(bin_centre, cv, n) / np.bincount(bin_centre, minlength=n)

    # directed: floor(theta / delta) buckets, theta = atan2(col offset, row offset)
    delta = 2 * np.pi / num_buckets
    theta = np.arctan2(dc, dr).reshape(-1)
    bucket = np.mod(np.floor(theta / delta).astype(np.int64), num_buckets)
    rho_d = _group_spearman(centre * num_buckets + bucket, d2.reshape(-1).astype(np.float64), e,
                            n * num_buckets).reshape(n, num_buckets)
    return {"M_U": float(np.mean(1 - rho_u)), "M_D": float(np.mean(1 - rho_d.mean(1))),
            "A_SU": float(np.mean(a_prime))}


def cosine_similarity_matrix(table: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(N, D)`` position vectors -> ``(N, N)`` float64 cosine similarities."""
    import torch
    if not isinstance(table, torch.Tensor) or table.ndim != 2:
        raise ValueError(f"table must be a (N, D) tensor; got {getattr(table, 'shape', type(table).__name__)}")
    t = table.detach().double()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(eps)
    return t @ t.T


# -- similarity of a model's position encoding ------------------------------------------------------
def _is_degenerate(table: torch.Tensor) -> bool:
    """True when every row is the same (no position signal), e.g. a zero table."""
    scale = table.abs().max()
    return bool(scale == 0 or (table - table[:1]).abs().max() <= 1e-7 * scale)


def _in_chans(model, pe) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if proj is not None and hasattr(proj, "in_channels"):
        return proj.in_channels
    return getattr(getattr(pe, "context", None), "in_chans", 3)


def _image_size(model, grid) -> tuple:
    """Input image size for ``grid``: grid times the model's patch size (16 px per cell without a model)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    return grid[0] * patch[0], grid[1] * patch[1]


def position_similarity(model, grid=None) -> tuple[torch.Tensor | None, str]:
    """``(N, N)`` float64 similarity of the patch positions of ``model``'s encoder, and how it was made.

    Args:
        model: a :class:`visionpe.models.vit.VisionPEViT` (its ``pe``, prefix tokens and grid are used) or
            a bare :class:`visionpe.PositionEncoder`.
        grid: ``(h, w)``; defaults to the model's patch grid (or the encoder's ``grid_size``).

    Returns ``(sim, method)`` with ``method`` one of ``"embedding"``, ``"rotary-kernel"``,
    ``"bias-kernel"``, ``"rotary+bias-kernel"``, or ``(None, "none")`` when the encoder has no
    content-independent position signal. The model is not changed (its train/eval mode is restored).
    Runs under ``torch.no_grad``: the result carries no autograd graph.
    """
    import torch
    with torch.no_grad():
        return _position_similarity(model, grid)


def _position_similarity(model, grid):
    import torch

    from visionpe.base import PositionEncoder
    from visionpe.layout import Layout
    pe = getattr(model, "pe", model)
    if not isinstance(pe, PositionEncoder):
        raise TypeError(f"model must be a VisionPEViT or a PositionEncoder; got {type(model).__name__}")
    if grid is None:
        pg = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        grid = tuple(pg) if pg is not None else pe.grid_size
    prefix = getattr(model, "num_prefix_tokens", pe.num_prefix_tokens)
    layout = Layout(tuple(grid), prefix)
    if layout.ndim != 2:
        raise ValueError(f"PESI is defined on 2D grids; got grid {layout.grid}")
    p = prefix
    param = next(iter(pe.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = pe.training
    pe.eval()  # dropout-free tables; restored below
    try:
        if "embed" in pe.hooks and -1 in pe.embed_stages:
            x0 = torch.zeros(1, layout.num_tokens, pe.dim, device=device, dtype=dtype)
            if pe.needs_image:
                # image-dependent PE (LOOPE): the table it gives an all-black image, the Three-Cell background
                image = torch.zeros(1, _in_chans(model, pe), *_image_size(model, layout.grid), device=device,
                                    dtype=dtype)
                table = pe.embed(x0, layout, -1, image=image)[0, p:].double()
            else:
                table = pe.embed(x0, layout, -1)[0, p:].double()
            if not _is_degenerate(table):
                return cosine_similarity_matrix(table), "embedding"
        if not ({"rotate", "bias"} & set(pe.hooks)):
            return None, "none"
        q = torch.ones(1, pe.num_heads, layout.num_tokens, pe.head_dim, device=device, dtype=dtype)
        total, count, parts = None, 0, set()
        for block in range(pe.depth):
            e = None
            if "rotate" in pe.hooks:
                qr, kr = pe.rotate(q, q.clone(), layout, block)
                qr, kr = qr[0, :, p:].double(), kr[0, :, p:].double()
                e = (qr @ kr.transpose(-1, -2)) / (qr.norm(dim=-1)[..., :, None] * kr.norm(dim=-1)[..., None, :])
                parts.add("rotary")
            if "bias" in pe.hooks:
                b = pe.bias(q, q, layout, block)
                if b is not None:
                    b = b[0, :, p:, p:].double()  # (H|1, N, N)
                    diag = torch.diagonal(b, dim1=-2, dim2=-1)
                    eb = torch.exp(b - 0.5 * (diag[..., :, None] + diag[..., None, :]))
                    e = eb if e is None else e * eb
                    parts.add("bias")
            if e is not None:
                e = e.expand(pe.num_heads, -1, -1).mean(0)
                total = e if total is None else total + e
                count += 1
        if total is None:
            return None, "none"
        sim = total / count
        if _is_degenerate(sim):
            return None, "none"
        return sim, "+".join(sorted(parts, key=lambda s: s != "rotary")) + "-kernel"
    finally:
        pe.train(was_training)


def model_pesi(model, grid=None, num_buckets: int = 60) -> dict[str, float]:
    """``{"M_U", "M_D", "A_SU"}`` of ``model``'s encoder (NaN when it has no position signal)."""
    sim, _ = position_similarity(model, grid)
    if sim is None:
        return {"M_U": math.nan, "M_D": math.nan, "A_SU": math.nan}
    g = grid if grid is not None else _model_grid(model)
    return pesi_from_similarity(sim, g, num_buckets)


def _model_grid(model):
    pg = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return tuple(pg) if pg is not None else getattr(model, "pe", model).grid_size


def default_centres(grid) -> list[tuple[int, int]]:
    """Four centres to show: top-left corner, middle, and two off-centre cells."""
    h, w = grid
    return [(0, 0), (h // 2, w // 2), (h // 4, (3 * w) // 4), ((3 * h) // 4, w // 4)]


def plot_similarity(sim, grid, path, title: str = "", centres=None) -> Path:
    """Save a PNG of the similarity maps ``E(c, .)`` (one panel per centre ``c``). Returns the path."""
    import torch
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, w = grid
    sim = np.asarray(sim.detach().cpu() if isinstance(sim, torch.Tensor) else sim)
    centres = centres or default_centres(grid)
    fig, axes = plt.subplots(1, len(centres), figsize=(2.6 * len(centres), 2.8))
    for ax, (ci, cj) in zip(np.atleast_1d(axes), centres):
        img = sim[ci * w + cj].reshape(h, w)
        im = ax.imshow(img, cmap="viridis")
        ax.plot(cj, ci, "r+", ms=8)
        ax.set_title(f"centre ({ci},{cj})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- command line ------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def main(argv=None) -> int:
    """``visionpe pesi``: PESI and heatmaps of encoders built (untrained) in a ViT with given settings."""
    import visionpe
    p = argparse.ArgumentParser(prog="visionpe pesi", description=(
        "PESI metrics (M_U, M_D, A_SU) and PE-similarity heatmaps of position encoders at initialisation, "
        "plus the paper's 1D-sinusoid reference row. Trained models: see 'visionpe threecell'."))
    from visionpe.cli_util import add_encoders_argument, check_encoders
    add_encoders_argument(p, help="all registered")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--embed-dim", type=int, default=768, help="token width (the paper uses 768)")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--buckets", type=int, default=60, help="direction buckets of M_D (paper: 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/pesi", help="output folder (pesi.md, pesi.csv, heatmaps/)")
    args = p.parse_args(argv)
    import torch
    try:
        names = visionpe.list_encoders() if args.encoders is None else check_encoders(args.encoders)
    except ValueError as e:
        p.error(str(e))
    import timm
    out = Path(args.out)
    grid = (args.img_size // args.patch_size,) * 2
    rows = []
    from visionpe.encoders.loope import sinusoid_1d
    ref = cosine_similarity_matrix(sinusoid_1d(torch.arange(grid[0] * grid[1], dtype=torch.float64), args.embed_dim))
    rows.append(("sinusoid_1d (reference)", "embedding", pesi_from_similarity(ref, grid, args.buckets)))
    plot_similarity(ref, grid, out / "heatmaps" / "sinusoid_1d.png", "1D sinusoid (raster order)")
    for name in names:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = timm.create_model("vpe_vit_tiny_patch16_224", pe=name, img_size=args.img_size,
                                  patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                                  num_heads=args.num_heads, num_classes=0,
                                  **visionpe.encoder_info(name).model_kwargs)
        sim, method = position_similarity(model)
        metrics = pesi_from_similarity(sim, grid, args.buckets) if sim is not None else \
            {"M_U": math.nan, "M_D": math.nan, "A_SU": math.nan}
        if sim is not None:
            plot_similarity(sim, grid, out / "heatmaps" / f"{name}.png", f"{name} ({method}, at init)")
        rows.append((name, method, metrics))
        print(f"{name:<24} {method:<20} M_U {_fmt(metrics['M_U'])}  M_D {_fmt(metrics['M_D'])}  "
              f"A_SU {_fmt(metrics['A_SU'])}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pesi.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["encoder", "method", "M_U", "M_D", "A_SU"])
        for name, method, m in rows:
            wr.writerow([name, method, m["M_U"], m["M_D"], m["A_SU"]])
    lines = [f"# PESI at initialisation ({grid[0]}x{grid[1]} grid, D={args.embed_dim}, "
             f"{args.buckets} direction buckets)", "", "| encoder | method | M_U | M_D | A_SU |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {meth} | {_fmt(m['M_U'])} | {_fmt(m['M_D'])} | {_fmt(m['A_SU'])} |" for n, meth, m in rows]
    (out / "pesi.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'pesi.md'}, {out / 'pesi.csv'} and {out / 'heatmaps'}/")
    return 0
