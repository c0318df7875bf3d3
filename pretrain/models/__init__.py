"""Networks: AlexNet-style trunks (conv1..conv5, fc6, fc7) and the cluster and hashing heads."""
from pretrain.models.alexnet import (
    ARCHS,
    LAYERS,
    AlexNetTrunk,
    ClusterHead,
    HashHead,
    build_trunk,
    fold_batchnorm,
)

__all__ = ["ARCHS", "LAYERS", "AlexNetTrunk", "ClusterHead", "HashHead", "build_trunk", "fold_batchnorm"]
