"""Stage 2: discriminative clustering (paper sec. 3.1; Singh et al. 2012 with the paper's changes).

`kmeans` (FAISS) initialises, `svm` trains all clusters' one-vs-rest SVMs as one batched problem,
`discover` runs the alternating loop over Ray-ready blocks of clusters, `merge` joins clusters whose
detectors fire on the same patches.
"""
