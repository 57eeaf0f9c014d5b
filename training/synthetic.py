"""Synthetic images from a running synthgen service as a torch Dataset, to mix with real data.

    from torch.utils.data import ConcatDataset
    from training.synthetic import SyntheticDataset

    synthetic = SyntheticDataset("http://127.0.0.1:3000", "pneumoniamnist", n=5000, seed=0)
    train = ConcatDataset([real_train, synthetic])
    minority = SyntheticDataset(url, "pneumoniamnist", None, labels={"normal": 2000}, seed=0)  # n from the counts
    # beside a torchvision dataset, whose items are (tensor, int): the same label type
    mnist = torchvision.datasets.MNIST("data", transform=torchvision.transforms.ToTensor())
    train = ConcatDataset([mnist, SyntheticDataset(url, "mnist", n=5000, target_transform=int)])

The n images are fetched once (npz; above the server's max_n in several requests, see
`service.client.SynthClient.generate`), when the dataset is created; items are
(float tensor C x H x W in [0, 1], int64 0-d tensor label), the item layout of the TensorDataset that
`training.data.ImageData.loader()` builds over real data, so the two concatenate and collate together.
`transform` and `target_transform` are applied to each item as torchvision's are: `target_transform=int` gives
torchvision's (tensor, int) items, which collate with a torchvision dataset's (a 0-d tensor beside an int does
not: "expected Tensor as element 2").
Labels follow the service's rules ("balanced" by default; a labels object of class counts, with n None,
asks for its sum; -1 for unconditional models). The same arguments
with the same seed give the same data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from service.client import SynthClient


class SyntheticDataset(Dataset):
    def __init__(self, url: str, dataset: str, n: int | None, model: str | None = None, labels="balanced",
                 seed: int | None = 0, transform=None, token: str | None = None, temperature: float | None = None,
                 target_transform=None):
        with SynthClient(url, token=token) as client:
            images, label_ids, class_names = client.generate(dataset, n=n, model=model, labels=labels, seed=seed,
                                                             temperature=temperature)
            self.seed = client.last_seed
        # uint8 N x H x W x C -> float N x C x H x W in [0, 1], converted once here rather than per item.
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255.0)
        self.labels = torch.from_numpy(label_ids.astype(np.int64))
        self.classes = list(class_names)
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        label = self.labels[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label
