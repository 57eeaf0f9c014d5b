"""Inception FID, for comparison with the literature: only where the user supplies the Inception weights file.

    python -m training.evaluate exported/mnist/cdcgan --inception-weights pt_inception-2015-12-05-6726825d.pth

The weights are pytorch-fid's port of the TensorFlow Inception that FID was defined with (file
`pt_inception-2015-12-05-6726825d.pth`, from the pytorch-fid release "fid_weights"); nothing here downloads
them. The network is torchvision's Inception-v3 with pytorch-fid's FID blocks (the TF graph's pooling quirks),
so with that file the 2048-d pool features are the ones pytorch-fid computes; images are uint8, replicated to
RGB when grayscale, scaled to [-1, 1] and resized bilinearly to 299x299, as pytorch-fid does.

On 28x28 MNIST or MedMNIST images Inception FID mostly measures how upsampled small images look to an
ImageNet network: the protocol's main FID (reference-classifier features, `training/evaluate.py`) is the one
our targets use. On a CPU, 10,000 images take about 10-20 minutes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048


class FIDInception(nn.Module):
    """uint8 images (N, C, H, W), C = 1 or 3 -> (N, 2048) pool features of the FID Inception network."""

    def __init__(self):
        super().__init__()
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
        from torchvision.models import Inception3

        net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
        net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, channels_7x7=128), FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, channels_7x7=160), FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
        self.net = net

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        n = self.net
        x = n.maxpool1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))
        x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)


def load_fid_inception(weights_path: str | Path) -> FIDInception:
    """The FID Inception with the user's weights file; a clear error when the file is missing or is another network."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights: no file at {path} (expected pytorch-fid's {INCEPTION_FILE}; "
                                "Inception FID is optional and nothing here downloads it)")
    model = FIDInception()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.net.load_state_dict(state)
    except Exception as exc:  # unpicklable file, or a state dict of another network
        raise ValueError(f"--inception-weights: {path} is not the FID Inception weights ({INCEPTION_FILE}): "
                         f"{str(exc)[:300]}") from None
    return model.eval()


@torch.no_grad()
def inception_features(model: FIDInception, images_u8: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """(N, 2048) float64 features of uint8 images (N, C, H, W), in batches."""
    parts = [model(images_u8[i:i + batch_size]).double() for i in range(0, len(images_u8), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, FEATURE_DIM, dtype=torch.float64)
