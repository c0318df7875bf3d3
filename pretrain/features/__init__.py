"""Stage 1, init features: dense SIFT + colour Fisher vectors (or HOG), PCA-whitened and
L2-normalised, for every patch.

`extract_features` runs the stage (resumable, one task per shard); `encode` turns patches into
features with a fitted `FisherEncoder`.
"""
from pretrain.features.descriptors import local_descriptors
from pretrain.features.extract import encode, encode_shard, extract_features
from pretrain.features.fisher import (FisherEncoder, fisher_vector_reference, fisher_vectors,
                                      fit_fisher_encoder)
from pretrain.features.hog import fit_hog_encoder, hog_features

__all__ = ["FisherEncoder", "encode", "encode_shard", "extract_features", "fisher_vector_reference",
           "fisher_vectors", "fit_fisher_encoder", "fit_hog_encoder", "hog_features", "local_descriptors"]
