"""The papers' released checkpoints: architecture, download location and reported accuracy.

One :class:`Release` per checkpoint. ``visionpe.models.registry`` registers ``vpe_<official name>`` with the
tag ``<tag>`` whose ``pretrained_cfg`` carries the official download location (``url`` or ``hf_hub_id``), so
``timm.create_model("vpe_deit_small_patch16_224_ctx_product_50_shared_k.cream_in1k", pretrained=True)`` fetches
and converts the official file. Accuracies are the ImageNet-1k top-1 the official READMEs report (not measured
here); ``source`` says which file they were read from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

__all__ = ["Release", "RELEASES", "SIZES", "release", "registry_entries"]

#: (embed_dim, depth, num_heads) of the official sizes
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}

_IRPE_URL = "https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/{}.pth"
_IRPE_SRC = "tests/reference/checkpoints/manifest.json (Cream iRPE README model zoo, commit 4a13c40)"
_ROPE_SRC = "tests/reference/checkpoints/manifest.json (rope-vit README, commit ce85c2e)"
_ROPE_README = "naver-ai/rope-vit README.md at commit ce85c2e (not in the manifest)"


@dataclass(frozen=True)
class Release:
    """A released checkpoint and the visionpe model that loads it.

    Attributes:
        name: the official model name (the registered timm name is ``vpe_<name>``).
        family: converter (``irpe``, ``ropevit``).
        size: ``tiny``/``small``/``base``/``large`` (see :data:`SIZES`).
        pe: visionpe encoder config of the official model.
        top1: ``{eval resolution: ImageNet-1k top-1 %}`` as reported by the authors.
        source: where ``top1`` was read.
        url / hf_hub_id / hf_hub_filename: official download location.
        reference: the file of ``tests/reference/checkpoints`` with the same layout (tiny random weights).
        tag: pretrained tag.
        model_kwargs: other ``vpe_vit_official`` arguments (LayerScale, ...).
    """

    name: str
    family: str
    size: str
    pe: Dict
    top1: Dict[int, float]
    source: str
    tag: str
    url: str = ""
    hf_hub_id: str = ""
    hf_hub_filename: str = ""
    reference: Optional[str] = None
    model_kwargs: Dict = field(default_factory=dict)
    license: str = ""
    origin_url: str = ""
    paper_id: str = ""

    @property
    def arch(self) -> str:
        return f"vpe_{self.name}"

    @property
    def model_name(self) -> str:
        """``arch.tag``, the name to give ``timm.create_model``."""
        return f"{self.arch}.{self.tag}"

    def model_args(self) -> Dict:
        dim, depth, heads = SIZES[self.size]
        return dict(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
                    qkv_bias=True, num_classes=1000, pe=dict(self.pe), norm_eps=1e-6, **self.model_kwargs)

    def pretrained_cfg(self) -> Dict:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        cfg = dict(url=self.url, num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                   interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
                   std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
                   license=self.license, origin_url=self.origin_url, paper_ids=self.paper_id,
                   notes=(f"official {self.name} weights converted on load by visionpe.models.official "
                          f"(family {self.family!r}); reported ImageNet-1k top-1 {self.top1} ({self.source})",))
        if self.hf_hub_id:
            cfg.update(hf_hub_id=self.hf_hub_id, hf_hub_filename=self.hf_hub_filename)
        return cfg


def _irpe(size: str, rpe_on: str, top1: float, reference: str) -> Release:
    name = f"deit_{size}_patch16_224_ctx_product_50_shared_{rpe_on}"
    return Release(name=name, family="irpe", size=size, tag="cream_in1k",
                   pe=dict(name="irpe", method="product", mode="contextual", rpe_on=rpe_on, shared_head=True,
                           ratio=1.9, ape=True),
                   top1={224: top1}, source=_IRPE_SRC, url=_IRPE_URL.format(name), reference=reference,
                   license="mit", origin_url="https://github.com/microsoft/Cream/tree/main/iRPE",
                   paper_id="arXiv:2107.14222")


def _rope(kind: str, ape: bool, size: str, top1_224: float, top1_384: float, source: str,
          reference: Optional[str]) -> Release:
    name = f"rope_{kind}{'_ape' if ape else ''}_deit_{size}_patch16_LS"
    pe = {"name": f"rope_{kind}{'_ape' if ape else ''}"}
    if kind == "axial":
        pe["theta"] = 100.0
    return Release(name=name, family="ropevit", size=size, tag="naver_in1k", pe=pe,
                   top1={224: top1_224, 384: top1_384}, source=source, hf_hub_id=f"naver-ai/{name}",
                   hf_hub_filename="pytorch_model.bin", reference=reference, model_kwargs=dict(init_values=1e-4),
                   license="apache-2.0", origin_url="https://github.com/naver-ai/rope-vit",
                   paper_id="arXiv:2403.13298")


_K, _QK, _QKV = ("irpe_deit_ctx_product_50_shared_k", "irpe_deit_ctx_product_50_shared_qk",
                 "irpe_deit_ctx_product_50_shared_qkv")
_AX, _MX, _AXA = "ropevit_rope_axial_deit_LS", "ropevit_rope_mixed_deit_LS", "ropevit_rope_axial_ape_deit_LS"

#: every released checkpoint of the families visionpe converts (PEG/CPVT and LOOPE released none)
RELEASES: Tuple[Release, ...] = (
    _irpe("tiny", "k", 73.7, _K),
    _irpe("small", "k", 80.9, _K),
    _irpe("base", "k", 82.3, _K),
    _irpe("small", "qk", 81.0, _QK),
    _irpe("small", "qkv", 81.2, _QKV),
    _irpe("base", "qkv", 82.8, _QKV),
    # RoPE-ViT: 224 accuracies from the manifest; the 384 column (no fine-tuning) from the README table
    _rope("axial", False, "small", 80.9, 80.0, _ROPE_SRC + "; 384: README", _AX),
    _rope("axial", False, "base", 83.6, 83.9, _ROPE_SRC + "; 384: README", _AX),
    _rope("axial", False, "large", 84.7, 85.1, _ROPE_SRC + "; 384: README", _AX),
    _rope("mixed", False, "small", 80.9, 81.8, _ROPE_SRC + "; 384: README", _MX),
    _rope("mixed", False, "base", 83.8, 84.4, _ROPE_SRC + "; 384: README", _MX),
    _rope("mixed", False, "large", 84.8, 85.6, _ROPE_SRC + "; 384: README", _MX),
    _rope("axial", True, "small", 80.7, 81.2, _ROPE_SRC + "; 384: README", _AXA),
    _rope("axial", True, "base", 83.7, 83.8, _ROPE_SRC + "; 384: README", _AXA),
    _rope("axial", True, "large", 84.7, 85.1, _ROPE_SRC + "; 384: README", _AXA),
    _rope("mixed", True, "small", 80.9, 81.7, _ROPE_README, None),
    _rope("mixed", True, "base", 83.8, 84.3, _ROPE_README, None),
    _rope("mixed", True, "large", 84.9, 85.5, _ROPE_README, None),
)


def release(name: str) -> Release:
    """The release called ``name`` (official name, ``vpe_`` name, or ``vpe_`` name with its tag)."""
    key = name.split(".")[0]
    key = key[len("vpe_"):] if key.startswith("vpe_") else key
    for r in RELEASES:
        if r.name == key:
            return r
    raise ValueError(f"unknown release {name!r}; known: {', '.join(r.name for r in RELEASES)}")


def registry_entries():
    """``[(arch, entry function, {tag: pretrained cfg})]`` for ``vpe_vit_official`` and every release.

    The entry functions take timm's ``create_model`` arguments (``pretrained``, overrides of the architecture);
    the registry gives them its module so timm finds their cfgs.
    """
    from .build import OFFICIAL_ARCH, create_official_vit

    def official(pretrained: bool = False, **kwargs):
        return create_official_vit(OFFICIAL_ARCH, pretrained=pretrained, **kwargs)
    official.__doc__ = ("A VisionPEViT for any official layout (visionpe.models.official.load_official builds it "
                        "from a checkpoint's tensors); all architecture arguments are keyword arguments.")
    entries = [(OFFICIAL_ARCH, official, {"untrained": None})]
    for r in RELEASES:
        def entry(pretrained: bool = False, _r: Release = r, **kwargs):
            return create_official_vit(_r.arch, pretrained=pretrained, **{**_r.model_args(), **kwargs})
        entry.__doc__ = (f"{r.name} ({r.family}, {r.size}) with the official weights as tag {r.tag!r}; reported "
                         f"ImageNet-1k top-1 {r.top1} ({r.source}).")
        entries.append((r.arch, entry, {r.tag: r.pretrained_cfg()}))
    return entries
