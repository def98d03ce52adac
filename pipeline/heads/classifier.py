"""The head's classifier: logistic regression on the standardised embedding (scikit-learn),
cross-validated with folds split by file, thresholds chosen on held-out scores, and the whole
folded into one weight and bias.

Why scikit-learn's LogisticRegression: a linear head on fixed embeddings is a convex problem,
and its L-BFGS solver reaches the optimum, so a head depends on the examples and C alone: no
learning rate, epochs or batch order to tune or to seed (torch would need all three written
here, and its results vary with them). It weighs classes against their frequency
(class_weight="balanced"), and it is one of the best-kept libraries in the field.

Single-label heads are one multinomial (softmax) regression; multi-label heads one binary
(sigmoid) regression per label. StandardScaler's mean and scale are folded into the weights,
so that Head.scores on the raw embedding gives exactly what the fitted model gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve
from sklearn.preprocessing import StandardScaler

MAX_ITERATIONS = 5000  # L-BFGS steps; far more than standardised embeddings need


@dataclass(frozen=True)
class FitSettings:
    multi_label: bool
    c: float = 1.0  # inverse L2 strength on the standardised embedding (scikit-learn's C)


@dataclass(frozen=True)
class LinearModel:
    """A fitted head: standardisation, then one softmax regression or one sigmoid per label."""

    scaler: StandardScaler
    regressions: tuple[LogisticRegression, ...]  # one (softmax), or one per label (sigmoid)
    multi_label: bool
    num_labels: int
    converged: bool

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, H) float64: what scikit-learn's model gives."""
        standardised = self.scaler.transform(np.asarray(embeddings, dtype=np.float64))
        if self.multi_label:
            regressions = self.regressions
            return np.stack([r.predict_proba(standardised)[:, 1] for r in regressions], axis=1)
        [regression] = self.regressions
        found = regression.predict_proba(standardised)  # (N, classes seen in training)
        scores = np.zeros((len(standardised), self.num_labels))
        scores[:, regression.classes_] = found
        return scores

    def weight_and_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, D) weight and (H,) bias on the raw embedding: logits = x @ W.T + b."""
        if self.multi_label:
            coef = np.concatenate([r.coef_ for r in self.regressions])  # (H, D)
            intercept = np.concatenate([r.intercept_ for r in self.regressions])  # (H,)
        else:
            [regression] = self.regressions
            coef, intercept = regression.coef_, regression.intercept_
            if len(regression.classes_) != self.num_labels:
                raise ValueError("the final fit must see every label")
            if self.num_labels == 2:
                # scikit-learn fits two classes as one logit z: softmax([-z/2, z/2]) is sigmoid(z).
                coef = np.concatenate([-coef / 2, coef / 2])
                intercept = np.concatenate([-intercept / 2, intercept / 2])
        # x_std = (x - mean) / scale  =>  x_std @ C.T + c = x @ (C / scale).T + (c - C @ mean/scale)
        weight = coef / self.scaler.scale_  # (H, D)
        bias = intercept - coef @ (self.scaler.mean_ / self.scaler.scale_)  # (H,)
        return weight, bias


def fit(embeddings: np.ndarray, targets: np.ndarray, settings: FitSettings) -> LinearModel:
    """(N, D) embeddings, (N, H) bool targets -> the fitted model (float64 throughout)."""
    scaler = StandardScaler()
    standardised = scaler.fit_transform(np.asarray(embeddings, dtype=np.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if settings.multi_label:
            regressions = tuple(
                _regression(settings.c).fit(standardised, targets[:, label])
                for label in range(targets.shape[1])
            )
        else:
            regressions = (_regression(settings.c).fit(standardised, targets.argmax(axis=1)),)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return LinearModel(scaler, regressions, settings.multi_label, targets.shape[1], converged)


def _regression(c: float) -> LogisticRegression:
    # lbfgs is deterministic: no random_state needed. Several classes -> multinomial (softmax).
    return LogisticRegression(
        C=c, class_weight="balanced", solver="lbfgs", max_iter=MAX_ITERATIONS, tol=1e-6
    )


def file_folds(file_targets: np.ndarray, file_windows: np.ndarray, folds: int, seed: int):
    """(F, H) bool labels and (F,) window counts per file -> (F,) int fold of each file.

    Iterative stratification by file (Sechidis et al., 2011): the rarest label's files are dealt
    first, each to the fold holding the fewest files of that label (then the fewest windows), in
    a seeded random order. A label with at least `folds` files is then in every held-out fold,
    and all windows of a file are on one side of every split.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(file_targets))  # (F,)
    fold_of = np.full(len(file_targets), -1, dtype=np.int64)
    label_counts = np.zeros((folds, file_targets.shape[1]))  # (K, H)
    window_counts = np.zeros(folds)  # (K,)
    for label in np.argsort(file_targets.sum(axis=0), kind="stable"):
        for file in order[file_targets[order, label]]:
            if fold_of[file] >= 0:
                continue
            fold = np.lexsort((window_counts, label_counts[:, label]))[0]
            fold_of[file] = fold
            label_counts[fold] += file_targets[file]
            window_counts[fold] += file_windows[file]
    return fold_of


@dataclass(frozen=True)
class HeldOut:
    """Every example window scored by a model that never saw its file."""

    scores: np.ndarray  # (N, H) float64
    fold_of: np.ndarray  # (N,) int: the fold the window was held out in
    folds: int
    converged: bool  # every fold's regressions converged


def cross_validate(
    embeddings: np.ndarray,
    targets: np.ndarray,
    file_of: np.ndarray,
    settings: FitSettings,
    folds: int,
    seed: int,
    echo: Callable[[str], None] = print,
) -> HeldOut:
    """k-fold cross-validation split by file: (N, D), (N, H) bool, (N,) file index."""
    file_targets = np.zeros((int(file_of.max()) + 1, targets.shape[1]), dtype=bool)  # (F, H)
    np.logical_or.at(file_targets, file_of, targets)
    file_windows = np.bincount(file_of, minlength=len(file_targets))  # (F,)
    fold_of = file_folds(file_targets, file_windows, folds, seed)[file_of]  # (N,)
    scores = np.zeros(targets.shape)
    converged = True
    for fold in range(folds):
        held = fold_of == fold
        model = fit(embeddings[~held], targets[~held], settings)
        scores[held] = model.probabilities(embeddings[held])
        converged &= model.converged
        echo(
            f"fold {fold + 1}/{folds}: trained on {int((~held).sum())} windows, "
            f"scored {int(held.sum())} held out"
        )
    return HeldOut(scores, fold_of, folds, converged)


@dataclass(frozen=True)
class Threshold:
    value: float
    reached: bool = True  # False: no threshold reaches --target-precision (the best is taken)


def choose_threshold(
    scores: np.ndarray, positive: np.ndarray, target_precision: float | None = None
) -> Threshold:
    """The threshold of one label on (n,) held-out scores with (n,) bool truths: the best F1,
    or the lowest one whose precision reaches `target_precision`. It lies halfway between the
    lowest score taken and the next lower one, so float32 rounding cannot flip a decision."""
    if not positive.any():
        return Threshold(1.0, target_precision is None)
    precision, recall, cuts = precision_recall_curve(positive, scores)
    precision, recall = precision[:-1], recall[:-1]  # (T,) against cuts ascending
    reached = True
    if target_precision is None:
        denominator = np.maximum(precision + recall, 1e-12)
        index = int(np.argmax(2 * precision * recall / denominator))  # ties: the lowest cut
    else:
        passing = np.flatnonzero(precision >= target_precision)
        reached = passing.size > 0
        index = int(passing[0]) if reached else int(np.argmax(precision))
    below = scores[scores < cuts[index]]
    value = (cuts[index] + below.max()) / 2 if below.size else cuts[index] / 2
    return Threshold(float(value), reached)


def thresholds_of(
    scores: np.ndarray, targets: np.ndarray, target_precision: float | None
) -> list[Threshold]:
    """One threshold per label, on (N, H) scores and (N, H) bool targets."""
    return [
        choose_threshold(scores[:, label], targets[:, label], target_precision)
        for label in range(targets.shape[1])
    ]


def nested_decisions(
    held_out: HeldOut, targets: np.ndarray, target_precision: float | None
) -> np.ndarray:
    """(N, H) bool: the head's labels on each held-out window, at thresholds chosen on the other
    folds' held-out scores only, so the report does not grade thresholds on their own data."""
    decisions = np.zeros(targets.shape, dtype=bool)
    for fold in range(held_out.folds):
        held = held_out.fold_of == fold
        others = thresholds_of(held_out.scores[~held], targets[~held], target_precision)
        values = np.array([threshold.value for threshold in others])  # (H,)
        decisions[held] = held_out.scores[held] >= values
    return decisions
