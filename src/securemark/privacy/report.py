"""What each data owner is shown: how well the vendor's attackers rebuilt *its* images.

Pure functions over an audit's result: per owner, every attacker's scores on that
owner's images, the leakage beyond the labels, the strongest attacker, and a short
markdown text (the owner's privacy report; the stage adds the pictures).
"""

from __future__ import annotations

from typing import Any

import torch

from securemark.privacy.scores import FLOOR, leakage, reconstruction_scores


def owner_scores(reconstructions: dict[str, torch.Tensor], originals: torch.Tensor, owners: torch.Tensor) -> dict[int, dict[str, Any]]:
    """Per owner (1-based id in ``owners``, one per row of ``originals``): each attacker's
    SSIM / PSNR / dCor on that owner's rows, ``leakage`` beyond the label floor on
    them, the ``strongest`` attacker and ``images`` (how many rows were scored)."""
    out: dict[int, dict[str, Any]] = {}
    for owner in sorted(int(k) for k in owners.unique()):
        rows = owners == owner
        scores = {name: reconstruction_scores(recon[rows], originals[rows]) for name, recon in reconstructions.items()}
        value, strongest = leakage(scores)
        out[owner] = {"images": int(rows.sum()), "leakage": value, "strongest": strongest, "label_floor_ssim": scores[FLOOR]["ssim"],
                      "attackers": scores}
    return out


def owner_markdown(owner: int, scores: dict[str, Any], variant: dict[str, Any], picture: str | None = None) -> str:
    """The privacy report of one owner: its own numbers, then the model's (``variant``:
    the audit's summary of the model the owner trained with, with its certified bound)."""
    lines = [f"# Privacy report for owner {owner}", "",
             f"The vendor's strongest attacker on your {scores['images']} audited images was **{scores['strongest']}**: "
             f"SSIM {scores['attackers'][scores['strongest']]['ssim']:.3f}, against {scores['label_floor_ssim']:.3f} for the "
             f"class-mean picture that your labels alone give (leakage beyond the labels **{scores['leakage']:+.3f}**).", "",
             "| attacker | SSIM | PSNR (dB) |", "|---|---|---|"]
    for name, s in sorted(scores["attackers"].items(), key=lambda item: -item[1]["ssim"]):
        lines.append(f"| {name} | {s['ssim']:.3f} | {s['psnr']:.1f} |")
    bound = variant.get("mse_lower_bound")
    lines += ["", f"Over all owners: leakage {variant['leakage']:+.3f} (strongest: {variant['strongest']})."]
    if bound:
        lines.append(f"Certified (dFIL): no unbiased reconstruction gets below a per-pixel mean squared error of "
                     f"{bound:.4f} on average over the audited images (pixels in [0, 1]); attackers that lean on a prior of garments can.")
    else:
        lines.append("No noise is added to what you send: nothing is certified.")
    if picture:
        lines += ["", f"Your images (top) beside the strongest reconstruction (bottom): `{picture}`."]
    return "\n".join(lines)
