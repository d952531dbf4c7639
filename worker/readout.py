"""The readout classifier: logistic regression on the sentiment pass's final hidden state.

The states are computed once (``QwenEngine.classifier_states``, on either
engine); every fit after that takes seconds, so the tuner can report a
leave-one-domain-out fold for every domain. scikit-learn does the fitting
(the ``[tune]`` extra); the result is two plain arrays, folded with the
standardisation, that the engine multiplies with the state of each job.

NumPy and scikit-learn only: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Inverse regularisation strengths tried; the tuner keeps the best by leave-one-domain-out accuracy
#: over the training domains (never data outside them).
C_GRID = (0.003, 0.01, 0.03, 0.1)


@dataclass(frozen=True)
class Readout:
    """Scores = states @ weight.T + bias: one row per label word, in label-set order."""

    weight: np.ndarray  # (labels, hidden) float32
    bias: np.ndarray    # (labels,) float32

    def scores(self, states: np.ndarray) -> np.ndarray:
        return states @ self.weight.T + self.bias                              # (n, labels)

    def predict(self, states: np.ndarray, positive_threshold: float = 0.5) -> np.ndarray:
        scores = self.scores(states)                                          # (n, labels)
        if scores.shape[1] == 2:  # label 0 is positive: it wins at the threshold, as the engine decides
            p_positive = 1.0 / (1.0 + np.exp(scores[:, 1] - scores[:, 0]))   # (n,)
            return np.where(p_positive >= positive_threshold, 0, 1)
        return scores.argmax(axis=1)


def fit(states: np.ndarray, golds: np.ndarray, c: float, labels: int = 2) -> Readout:
    """Standardised L2 logistic regression on (n, hidden) states and gold label indices."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(states)
    model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(states), golds)
    coef = model.coef_ / scaler.scale_                                         # (1 or labels, hidden)
    intercept = model.intercept_ - coef @ scaler.mean_                        # (1 or labels,)
    if coef.shape[0] == 1:  # binary: sklearn scores the second class against the first
        weight = np.zeros((labels, coef.shape[1]))
        bias = np.zeros(labels)
        weight[model.classes_[1]], bias[model.classes_[1]] = coef[0], intercept[0]
    else:
        weight, bias = np.zeros((labels, coef.shape[1])), np.zeros(labels)
        weight[model.classes_], bias[model.classes_] = coef, intercept
    return Readout(weight.astype(np.float32), bias.astype(np.float32))


def accuracy(readout: Readout, states: np.ndarray, golds: np.ndarray) -> float:
    return float((readout.predict(states) == golds).mean()) if len(golds) else float("nan")


def leave_one_domain_out(states: np.ndarray, golds: np.ndarray, domains: np.ndarray, c: float,
                         labels: int = 2) -> dict[str, float]:
    """Domain -> accuracy on all its rows of a readout fitted on every other domain's rows."""
    folds = {}
    for domain in sorted(set(domains.tolist())):
        inside = domains == domain
        readout = fit(states[~inside], golds[~inside], c, labels)
        folds[domain] = accuracy(readout, states[inside], golds[inside])
    return folds


def choose_c(states: np.ndarray, golds: np.ndarray, domains: np.ndarray, labels: int = 2,
             grid: tuple[float, ...] = C_GRID) -> tuple[float, dict[float, dict[str, float]]]:
    """The C with the best mean leave-one-domain-out accuracy (ties: the stronger regularisation), and
    every C's folds."""
    folds = {c: leave_one_domain_out(states, golds, domains, c, labels) for c in grid}
    best = max(grid, key=lambda c: (round(float(np.mean(list(folds[c].values()))), 4), -c))
    return best, folds
