"""The two standard evaluations of frozen features: a linear classifier and k-nearest neighbours.

Both choose their one setting (the SVM's / logistic regression's C, k) by stratified cross-validation
on the training split alone, then fit on the whole training split and predict the test split: the test
labels score, they never choose. Features are standardised with the training split's statistics for
the linear classifier (one C grid serves every feature kind); k-NN votes among the k nearest training
images by cosine similarity of the raw features.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

LINEAR = ("svm", "logreg")


@dataclass(frozen=True)
class ProbeResult:
    predictions: np.ndarray  # (n_test,) int64
    accuracy: float
    chosen: dict  # the setting cross-validation chose, e.g. {"C": 0.1}
    cv_accuracy: float  # its mean accuracy over the training split's folds


def _cv(labels: np.ndarray, folds: int, seed: int):
    """Stratified folds on the training split; fewer when the rarest class has fewer images."""
    n = int(min(folds, np.bincount(labels)[np.unique(labels)].min()))
    return StratifiedKFold(n, shuffle=True, random_state=seed) if n >= 2 else None


def _fit(estimator, grid: dict, x: np.ndarray, y: np.ndarray, folds: int, seed: int):
    cv = _cv(y, folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the time; accuracy is what counts
        if cv is None or all(len(v) == 1 for v in grid.values()):
            model = estimator.set_params(**{k: v[0] for k, v in grid.items()}).fit(x, y)
            return model, {k.split("__")[-1]: v[0] for k, v in grid.items()}, float("nan")
        search = GridSearchCV(estimator, grid, cv=cv, scoring="accuracy", refit=True, n_jobs=1).fit(x, y)
    return search.best_estimator_, {k.split("__")[-1]: v for k, v in search.best_params_.items()}, \
        float(search.best_score_)


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                 kind: str = "logreg", cs: tuple[float, ...] = (0.01, 0.1, 1.0), cv_folds: int = 3,
                 max_iter: int = 2000, seed: int = 0) -> ProbeResult:
    """Multinomial logistic regression (`kind` logreg) or the paper's one-vs-rest linear SVM (svm) on
    standardised features, C by cross-validation on the training split."""
    if kind not in LINEAR:
        raise ValueError(f"kind must be one of {', '.join(LINEAR)}, got {kind!r}")
    clf = LinearSVC(max_iter=max_iter, random_state=seed) if kind == "svm" else \
        LogisticRegression(max_iter=max_iter, random_state=seed)
    model, chosen, cv_acc = _fit(make_pipeline(StandardScaler(), clf), {f"{type(clf).__name__.lower()}__C": list(cs)},
                                 x_train, y_train, cv_folds, seed)
    pred = model.predict(x_test).astype(np.int64)
    return ProbeResult(pred, float(np.mean(pred == y_test)), chosen, cv_acc)


def knn_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
              ks: tuple[int, ...] = (1, 5, 10, 20), cv_folds: int = 3, seed: int = 0) -> ProbeResult:
    """k-NN by cosine similarity (brute force), k by cross-validation on the training split."""
    ks = [k for k in ks if k <= len(y_train) - len(y_train) // max(cv_folds, 2)] or [1]
    model, chosen, cv_acc = _fit(KNeighborsClassifier(metric="cosine", algorithm="brute"), {"n_neighbors": ks},
                                 x_train, y_train, cv_folds, seed)
    pred = model.predict(x_test).astype(np.int64)
    return ProbeResult(pred, float(np.mean(pred == y_test)), {"k": chosen["n_neighbors"]}, cv_acc)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: row = true class, column = predicted."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    """Recall per class from a confusion matrix (NaN for a class without test images)."""
    totals = conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(conf) / totals, np.nan)
