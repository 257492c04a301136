"""Derive the small test copies of the shared VLM golden vectors (vlm_rope/, v2pe_cca/).

    python tests/reference/vlm_rope/trim_vlm_vectors.py <shared reference folder>

JSON files are copied unchanged. The ``.pt`` tensors are reduced: cos/sin keep their first half (the stored
tables satisfy ``cos[:, i] == cos[:, i + 64]``, which this script asserts), V2PE's 530-row case keeps a
row subset, and CCA's 24x24 mask is bit-packed. Values are not altered.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/reference


def half(t):
    assert torch.equal(t[:, :64], t[:, 64:]), "cos/sin halves differ"
    return t[:, :64].clone()


def main(src):
    vr, vc = os.path.join(src, "vlm_rope"), os.path.join(src, "v2pe_cca")
    out_r, out_c = os.path.join(HERE, "vlm_rope"), os.path.join(HERE, "v2pe_cca")
    for f in ["layouts.json", "mrope_qwen2vl.json", "mrope_qwen25vl.json", "mrope_qwen3vl.json", "vrope.json",
              "hope.json", "manifest.json"]:
        shutil.copyfile(os.path.join(vr, f), os.path.join(out_r, f))
    for f in ["v2pe_positions.json", "cca.json", "manifest.json"]:
        shutil.copyfile(os.path.join(vc, f), os.path.join(out_c, f))
    qk = torch.load(os.path.join(vr, "inputs_qk.pt"), weights_only=True)
    rot = {}
    for name in ["mrope_qwen2vl", "mrope_qwen25vl", "mrope_qwen3vl", "vrope", "hope"]:
        d = torch.load(os.path.join(vr, name + ".pt"), weights_only=True)
        for key, t in d.items():
            if key == "inv_freq":
                rot[f"{name}/inv_freq"] = t.clone()
                continue
            rot[f"{name}/{key}"] = half(t) if key.endswith(("/cos", "/sin")) else t.clone()
    for key, t in qk.items():
        rot[f"inputs/{key}"] = t.clone()
    torch.save(rot, os.path.join(out_r, "rotations.pt"))

    v = torch.load(os.path.join(vc, "v2pe.pt"), weights_only=True)
    c = torch.load(os.path.join(vc, "cca.pt"), weights_only=True)
    out = {}
    rows = torch.cat([torch.arange(0, 48), torch.arange(500, 530)])
    for case in ["train_A_fix_stride4", "train_A_fix_stride1", "eval_C_fix_stride64"]:
        sel = rows if case.startswith("eval_C") else torch.arange(v[f"{case}/rope/q"].shape[0])
        out[f"v2pe/{case}/rows"] = sel
        out[f"v2pe/{case}/inv_freq"] = v[f"{case}/rope/inv_freq"].clone()
        for k in ["cos", "sin"]:
            out[f"v2pe/{case}/{k}"] = half(v[f"{case}/rope/{k}"])[sel].clone()
        for k in ["q", "k", "q_rot", "k_rot"]:
            out[f"v2pe/{case}/{k}"] = v[f"{case}/rope/{k}"][sel].clone()
    for k in ["q", "k", "q_rot", "k_rot"]:
        out[f"cca/4x4/rope/{k}"] = c[f"4x4/rope/{k}"].clone()
    for k in ["cos", "sin"]:
        out[f"cca/4x4/rope/{k}"] = half(c[f"4x4/rope/{k}"])
    for g in ["24x24", "4x4", "5x5", "6x4"]:
        out[f"cca/{g}/full_position_ids"] = c[f"{g}/full_position_ids"].clone()
        out[f"cca/{g}/ring_grid"] = c[f"{g}/ring_grid"].clone()
    m = c["24x24/full_allowed"].numpy()
    out["cca/24x24/full_allowed_packbits"] = torch.from_numpy(np.packbits(m.reshape(-1)))
    out["cca/24x24/full_allowed_shape"] = torch.tensor(m.shape)
    out["cca/batch2_4x4/full_allowed"] = c["batch2_4x4/full_allowed"].clone()
    out["cca/rev_4x4/full_position_ids"] = c["rev_4x4/full_position_ids"].clone()
    out["cca/rev_4x4/full_allowed"] = c["rev_4x4/full_allowed"].clone()
    torch.save(out, os.path.join(out_c, "tensors.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
