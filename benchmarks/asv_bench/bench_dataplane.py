"""The data plane's per-message work: a tensor to frames and back (the codec every peer link runs)."""

from __future__ import annotations

import torch


class TensorFrames:
    """Encode a cut tensor (64 x 640 float32, the tutorial's widest cut) and decode it again."""

    params = [[64 * 128, 64 * 640, 1024 * 640]]
    param_names = ["elements"]

    def setup(self, elements):
        from splitnn.wire.tensor_codec import decode_tensor, encode_tensor

        self.encode, self.decode = encode_tensor, decode_tensor
        self.tensor = torch.randn(elements)
        self.payload = encode_tensor(self.tensor)

    def time_encode(self, elements):
        self.encode(self.tensor)

    def time_decode(self, elements):
        self.decode(self.payload)
