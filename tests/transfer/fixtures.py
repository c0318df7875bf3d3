"""Pretraining checkpoints for the transfer tests, written the way pretraining writes them."""
import torch

from pretrain.models.alexnet import build_trunk
from pretrain.models.weights import save_weights


def trained_like_trunk(seed: int = 0, width: float = 0.25):
    """An alexnet96 trunk with non-trivial BatchNorm statistics, as training leaves them."""
    torch.manual_seed(seed)
    trunk = build_trunk("alexnet96", width=width)
    for m in trunk.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return trunk.eval()


def write_final(path, trunk, width: float = 0.25, extra: dict | None = None, drop: str = ""):
    """A final.safetensors as pretraining writes it: bare trunk keys + the hashing layer."""
    tensors = {k: v for k, v in trunk.state_dict().items() if k != drop}
    d = trunk.feature_dim
    tensors.update({"hash.weight": torch.randn(d, 16), "hash.mean": torch.zeros(d),
                    "hash.num_updates": torch.ones((), dtype=torch.long)}, **(extra or {}))
    meta = {"model": {"arch": "alexnet96", "width": width, "dropout": 0.5}, "bits": 16}
    return save_weights(path, tensors, meta)
