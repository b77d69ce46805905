"""chainrule: a fast, transparent neural-network library.

C++ kernels (:mod:`chainrule.kernels`, with NumPy twins in
:mod:`chainrule.reference`) under a Python layer small enough to read in one
sitting, following a lecture on neural networks: logistic regression, basis
functions, activations, cross-entropy, mini-batch SGD and backpropagation
with Jacobians.

Quick tour
----------
>>> import chainrule as cr
>>> X, y = cr.data.make_circles(400, noise=0.1, factor=0.5, seed=0)
>>> model = cr.Sequential(cr.Dense(2, 8), cr.Tanh(), cr.Dense(8, 1), seed=0)
>>> history = cr.fit(model, X, y, loss=cr.BinaryCrossEntropy(),
...                  optimizer=cr.SGD(model.parameters(), lr=0.5),
...                  epochs=100, seed=0, progress=False)       # doctest: +SKIP
>>> cr.predict(model, X)                                      # doctest: +SKIP
"""

from . import kernels, reference
from .kernels import get_num_threads, set_num_threads
from . import activations, data, features, losses, metrics, optim
from .layers import (
    Dense,
    Identity,
    Layer,
    LeakyReLU,
    LogSoftmax,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)
from .losses import MSE, BinaryCrossEntropy, CrossEntropy, Loss
from .optim import SGD, Adam, ConstantLR, CosineLR, ExponentialLR, InverseScalingLR, StepLR
from .train import (
    Callback,
    ConvergenceWarning,
    EarlyStopping,
    History,
    batches,
    evaluate,
    fit,
    gradient_norms,
    predict,
    predict_proba,
)
from .jacobian import chain_product, gradcheck, jacobian, jacobian_chain
from .io import load, save
from .features import PolynomialBasis

__version__ = "0.1.0"

__all__ = [
    "kernels", "reference", "activations", "data", "features", "losses", "metrics", "optim",
    "set_num_threads", "get_num_threads",
    "Layer", "Parameter", "Dense", "Sequential",
    "Sigmoid", "Tanh", "ReLU", "LeakyReLU", "Softmax", "LogSoftmax", "Identity",
    "Loss", "BinaryCrossEntropy", "CrossEntropy", "MSE",
    "SGD", "Adam", "ConstantLR", "StepLR", "ExponentialLR", "InverseScalingLR", "CosineLR",
    "fit", "batches", "History", "Callback", "EarlyStopping", "ConvergenceWarning",
    "predict", "predict_proba", "evaluate", "gradient_norms",
    "jacobian", "jacobian_chain", "chain_product", "gradcheck",
    "save", "load", "PolynomialBasis", "__version__",
]
