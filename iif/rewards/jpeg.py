"""``compressibility`` / ``incompressibility`` (DDPO, Black et al. 2023): ``r(x) = sign * kB(JPEG_q(x))``, the size in
kilobytes (1000 bytes) of the image written as a JPEG of quality ``q`` by PIL. A black-box reward: no gradient, no
weights."""
from __future__ import annotations

import io

import numpy as np
import torch

from iif.rewards.base import Reward

Tensor = torch.Tensor


class JPEGSizeReward(Reward):
    """``r(x) = sign * |JPEG_q(to_uint8(x))| / 1000``.

    ``to_uint8(x) = round(255 (x + 1) / 2)`` clipped to ``[0, 255]`` (pixels in ``[-1, 1]``); a 3-channel image is
    written as RGB, a 1-channel one as greyscale; PIL's encoder at ``quality``, default subsampling and tables.
    ``sign = -1`` is DDPO's compressibility (smaller files score higher), ``sign = +1`` its incompressibility.

    Args:
        sign: ``-1`` or ``+1``.
        quality: the JPEG quality, 1..100 (DDPO: 95; PIL advises against more than 95).
        temperature: ``lambda`` (in kB).
    """

    differentiable = False

    def __init__(self, sign: float = -1.0, quality: int = 95, temperature: float = 1.0,
                 name: str = "compressibility"):
        super().__init__(temperature=temperature, name=name)
        if float(sign) not in (-1.0, 1.0):
            raise ValueError(f"reward.sign must be -1 (compressibility) or +1 (incompressibility), got {sign}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"reward.quality must be in 1..100 (PIL's JPEG qualities), got {quality}")
        self.sign, self.quality = float(sign), int(quality)

    def jpeg_kb(self, x: Tensor) -> list[float]:
        """``[B, C, H, W]`` (``C`` = 1 or 3) in ``[-1, 1]`` -> the ``B`` JPEG sizes in kB."""
        from PIL import Image

        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"reward '{self.name}' expects images [B, 1 or 3, H, W], got {tuple(x.shape)}")
        pixels = ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for a in arrays:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a)).save(
                buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return sizes

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, C, H, W]`` in ``[-1, 1]`` -> ``[B]`` (on ``x``'s device; the condition is not used)."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return self.sign * torch.tensor(self.jpeg_kb(x), dtype=dtype, device=x.device)
