"""What one backward pass gives besides the gradient: BackPACK's quantities, on every layer.

fbp's backward pass is explicit, so each layer holds its input and receives
its output gradient for every example — exactly what is needed for much more
than the summed gradient (Dangel, Kunstner & Hennig, 2020, "BackPACK:
Packing more into backprop"). :func:`value_grad_and` runs the forward pass
once, the backward pass once, and reads the requested quantities off each
layer as the walker (:mod:`fbp.nn.walk`) passes it::

    f = fbp.quantities.value_grad_and(model, loss, batch_l2(), variance(), diag_ggn())
    value, grads, (sq_norms, var, ggn) = f(params, x, y)

With ``ℓ_n`` the loss of example ``n`` alone and ``N`` the batch size (fbp's
losses are means, so ``L = (1/N) Σ_n ℓ_n`` and ``g_n = ∇ℓ_n / N`` sum to the
gradient):

=====================  ==========================================================
``batch_grad()``       params-shaped, each leaf with a leading batch axis: ``g_n``
``batch_l2()``         params-shaped ``(N,)`` arrays: ``‖g_n‖²`` per leaf
``sum_grad_squared()`` params-shaped: ``Σ_n g_n²`` (elementwise)
``variance()``         params-shaped: ``(1/N) Σ_n (∇ℓ_n)² − (∇L)²``
``diag_ggn()``         params-shaped: the diagonal of ``(1/N) Σ_n J_nᵀ H_n J_n``
``diag_ggn_mc(s)``     the same, estimated from ``s`` sampled labels per example
``kflr()``             ``{layer path: {param: KroneckerFactors(a, g)}}``, exact ``H_n``
``kfac(s)``            the same from ``s`` sampled labels per example
``clipped_grad(C)``    ``ClippedGrad(grads, norms)``: DP-SGD's ``Σ_n min(1, C/‖∇ℓ_n‖) g_n``
=====================  ==========================================================

``J_n`` is the Jacobian of example ``n``'s network output with respect to
the params and ``H_n`` the Hessian of ``ℓ_n`` with respect to that output.

How each is computed
--------------------

*First order.* A layer's fast rule reads them off its cache and output
gradient. A layer whose weights act as a dense map (dense, conv in patches
form, recurrent and attention weights shared over steps and positions)
declares ``Extensions.outer_factors``: the pairs ``(a, g)`` with example
``n``'s gradient ``Σ_t a_ntᵀ·g_nt``. Then ``Σ_n g_n²`` is ``(a²)ᵀ·(g²)`` for a
dense layer on vectors — one matrix product, no per-example gradient formed —
and per-example gradients are formed (one einsum) only where steps or
positions make the square of a sum necessary; there the batch gradient is
their sum, and the rule's own ``dW = aᵀ·g`` (the same arithmetic again) is
dropped. Other layers (layer norm,
embedding, a user's own) use their ``batch_grad`` rule or the walker's
fallback (their own forward and backward per example under ``vmap``).

*Curvature.* ``H_n = S_n S_nᵀ`` is factored per loss: softmax
cross-entropy's ``diag(p) − ppᵀ`` by ``diag(√p) − p·√pᵀ`` (Σ p = 1), the
mean squared error's ``(2/D)·I`` by ``√(2/D)·I``, sigmoid cross-entropy's
``diag(σ(1 − σ))/D`` by its square root; any other loss by an eigendecomposition
of its per-example Hessian (``jax.hessian``; negative eigenvalues, which a
convex loss has not, are set to zero). Each column of ``S_n / √N`` is sent
backward through the model — the columns in turn (``jax.lax.map``), so ``C``
outputs cost about ``C`` backward passes — and each layer squares (``diag_ggn``) or
multiplies out (``kflr``) what reaches it. On a one-step pair (a dense layer
on vectors) the squares need no per-column product: ``Σ_c (a_n ĝ_ncᵀ)² =
a_n²·(Σ_c ĝ_nc²)ᵀ``, so each column only adds its ``ĝ²`` and one product with
``a²`` follows the loop (measured: the wide MLP's exact ``diag_ggn`` from 22× to
7× a gradient). The Monte-Carlo versions send
instead the gradient of ``ℓ_n`` at labels drawn from the model's predictive
distribution (a class from ``softmax(z)``, a bit from ``σ(z)``, a Gaussian
label for the squared error), scaled so that its second moment is ``H_n``:
unbiased, and ``samples`` backward passes.

*Kronecker factors.* For a weight with pairs ``(a, g)`` over ``T`` steps or
positions, ``A = (1/(N·T)) Σ_{n,t} a_nt a_ntᵀ`` and ``G = Σ_{n,t,c} ĝ_ntc
ĝ_ntcᵀ``, ``ĝ`` the propagated columns of ``S_n/√N``: the GGN block of the
weight (flattened row-major, ``w[i, j]`` at ``i·q + j``) is approximated by
``A ⊗ G`` — exact for one example on a dense layer. With ``T = 1`` these are
BackPACK's KFLR/KFAC factors of a linear layer. For convolutions, recurrent
and attention weights (shared over positions or steps) this is the
"expand" approximation of Eschenhagen et al. (2023, "Kronecker-factored
approximate curvature for modern neural network architectures"): the
positions are treated as extra examples, and the cross terms between
positions of one example are dropped. ``approximation="reduce"`` gives
their other one: ``A = (1/N) Σ_n ā_n ā_nᵀ`` with ``ā_n = (1/T) Σ_t a_nt``
and ``G = Σ_{n,c} (Σ_t ĝ_ntc)(Σ_t ĝ_ntc)ᵀ`` — exact for one example whose
inputs are the same at every position. BackPACK's factors of a convolution
are neither: its ``A`` is ``T`` times expand's and its ``G`` is reduce's
(its own code notes the mismatch with the KFC paper's scale); with ``T =
1`` all three agree. A bias is the weight of a constant
input ``a = 1``, so its ``A`` is ``[[1]]`` and its block is ``G``. A layer
that declares no ``outer_factors`` gets, per params leaf, ``A = [[1]]`` and
``G`` the leaf's whole (exact or sampled) GGN block — exact, but quadratic in
the leaf's size, so refused above ``MAX_FALLBACK_BLOCK`` entries.

*DP-SGD in one backward pass* (the "book-keeping" of Bu et al., 2023,
"Differentially private optimization on large model at small cost"): the
per-example norms come from the same pairs (or per-example gradients) the
backward pass leaves at each layer; once all are known, the clipped sum
``Σ_n c_n g_n`` is each layer's ``aᵀ·(c ⊙ g)`` — a reweighting, not a second
backward pass.

Params shared by two layers (:func:`fbp.nn.tie`) have each use's per-example
gradient formed (``walk.batch_grad``) and added before anything is squared.
Batch norm in training mixes the examples of a batch: there ``ℓ_n`` depends on
the other examples and no per-example quantity exists, so every quantity
raises :class:`fbp.ConfigError` naming the layer (use ``train=False``).

:func:`hessian_vector_product` differentiates fbp's own backward pass
forward-mode (``jax.jvp`` through :func:`fbp.grad`): the hand-derived backward
is itself differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp import losses as _losses
from fbp.backprop import _check, grad
from fbp.errors import ConfigError
from fbp.losses import Loss
from fbp.nn import walk
from fbp.nn.core import Layer, row_sq_norms
from fbp.nn.dense import per_example_outer_sq_norms

__all__ = [
    "APPROXIMATIONS",
    "KFAC",
    "KFLR",
    "MAX_FALLBACK_BLOCK",
    "BatchGrad",
    "BatchL2",
    "ClippedGrad",
    "ClippedGradient",
    "DiagGGN",
    "DiagGGNMC",
    "KroneckerFactors",
    "SumGradSquared",
    "Variance",
    "batch_grad",
    "batch_l2",
    "clipped_grad",
    "diag_ggn",
    "diag_ggn_mc",
    "hessian_factor",
    "hessian_vector_product",
    "kfac",
    "kflr",
    "sampled_hessian_factor",
    "sum_grad_squared",
    "value_grad_and",
    "variance",
]

Params = Any
MAX_FALLBACK_BLOCK = 4096
"""The largest params leaf (in entries) whose whole GGN block the Kronecker fallback forms."""


# --------------------------------------------------------------------------- the quantities


class BatchGrad(NamedTuple):
    """Request each example's gradient ``g_n = ∇ℓ_n / N`` (see :func:`batch_grad`)."""


class BatchL2(NamedTuple):
    """Request each example's squared gradient norm per leaf (see :func:`batch_l2`)."""


class SumGradSquared(NamedTuple):
    """Request ``Σ_n g_n²`` elementwise (see :func:`sum_grad_squared`)."""


class Variance(NamedTuple):
    """Request the gradient's elementwise variance over examples (see :func:`variance`)."""


class DiagGGN(NamedTuple):
    """Request the exact diagonal of the generalised Gauss-Newton (see :func:`diag_ggn`)."""


class DiagGGNMC(NamedTuple):
    """Request a Monte-Carlo GGN diagonal from ``samples`` labels (see :func:`diag_ggn_mc`)."""

    samples: int = 1


class KFAC(NamedTuple):
    """Request Kronecker factors from ``samples`` sampled labels (see :func:`kfac`)."""

    samples: int = 1
    approximation: str = "expand"


class KFLR(NamedTuple):
    """Request Kronecker factors from the exact loss Hessian (see :func:`kflr`)."""

    approximation: str = "expand"


class ClippedGrad(NamedTuple):
    """Request DP-SGD's clipped gradient with bound ``max_norm`` (see :func:`clipped_grad`)."""

    max_norm: float


class KroneckerFactors(NamedTuple):
    """One weight's curvature block approximated as ``A ⊗ G`` (``kfac``, ``kflr``).

    Attributes:
      a: ``(p, p)``, the second moment of the layer's (patch-)inputs.
      g: ``(q, q)``, that of its output gradients (propagated Hessian factors).
    """

    a: jax.Array
    g: jax.Array


class ClippedGradient(NamedTuple):
    """The result of :func:`clipped_grad`.

    Attributes:
      grads: ``Σ_n c_n g_n = (1/N) Σ_n c_n ∇ℓ_n`` with ``c_n = min(1, C/‖∇ℓ_n‖)``,
        params-shaped: the mean of the clipped per-example gradients.
      norms: ``‖∇ℓ_n‖`` over all params, shape ``(N,)``, before clipping.
    """

    grads: Params
    norms: jax.Array


Quantity = (
    BatchGrad
    | BatchL2
    | SumGradSquared
    | Variance
    | DiagGGN
    | DiagGGNMC
    | KFAC
    | KFLR
    | ClippedGrad
)
_FIRST_ORDER = (BatchGrad, BatchL2, SumGradSquared, Variance, ClippedGrad)
_SECOND_ORDER = (DiagGGN, DiagGGNMC, KFAC, KFLR)


def batch_grad() -> BatchGrad:
    """Each example's gradient ``g_n = ∇ℓ_n / N``: params-shaped, leaves ``(N, *shape)``.

    The ``g_n`` sum to the batch gradient. This materialises ``N`` copies of
    the gradient (for a 1.8M-parameter MLP at batch 256, 1.9 GB in float32):
    prefer :func:`batch_l2`, :func:`sum_grad_squared` or :func:`clipped_grad`
    where they say what you need.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> q = quantities.batch_grad()
      >>> f = jax.jit(quantities.value_grad_and(model, losses.softmax_cross_entropy, q))
      >>> _, grads, (g,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))
      >>> g[0]["w"].shape
      (5, 4, 3)
    """
    return BatchGrad()


def batch_l2() -> BatchL2:
    """``‖g_n‖²`` for each example and params leaf: params-shaped ``(N,)`` arrays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(
      ...     quantities.value_grad_and(model, losses.softmax_cross_entropy, quantities.batch_l2()))
      >>> _, _, (sq,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))
      >>> sq[0]["b"].shape
      (5,)
    """
    return BatchL2()


def sum_grad_squared() -> SumGradSquared:
    """``Σ_n g_n²`` elementwise, params-shaped (the second moment Adam-like methods estimate).

    For a dense layer on vectors ``(x²)ᵀ·(δ²)``: no per-example gradient formed.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> q = quantities.sum_grad_squared()
      >>> _, _, (s,) = jax.jit(quantities.value_grad_and(model, losses.mse, q))(
      ...     params, jnp.ones((5, 4)), jnp.zeros((5, 3)))
      >>> s[0]["w"].shape
      (4, 3)
    """
    return SumGradSquared()


def variance() -> Variance:
    """``(1/N) Σ_n (∇ℓ_n)² − (∇L)²`` elementwise: the gradient's variance over examples.

    Equals ``N·Σ_n g_n² − grads²`` (clipped at zero against rounding).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(quantities.value_grad_and(model, losses.mse, quantities.variance()))
      >>> _, _, (v,) = f(params, jnp.ones((5, 4)), jnp.zeros((5, 3)))
      >>> bool((v[0]["w"] >= 0).all())
      True
    """
    return Variance()


def diag_ggn() -> DiagGGN:
    """The exact diagonal of the GGN ``(1/N) Σ_n J_nᵀ H_n J_n``, params-shaped.

    Costs about one backward pass per network output (``C`` for ``C`` classes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(
      ...     quantities.value_grad_and(model, losses.softmax_cross_entropy, quantities.diag_ggn()))
      >>> _, _, (d,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))
      >>> d[0]["w"].shape
      (4, 3)
    """
    return DiagGGN()


def diag_ggn_mc(samples: int = 1) -> DiagGGNMC:
    """An unbiased Monte-Carlo estimate of :func:`diag_ggn` from ``samples`` labels per example.

    Labels are drawn from the model's predictive distribution with the
    ``key`` given to the returned function (required).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(quantities.value_grad_and(
      ...     model, losses.softmax_cross_entropy, quantities.diag_ggn_mc(samples=2)))
      >>> _, _, (d,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32), key=jax.random.key(1))
    """
    return DiagGGNMC(_positive_int("diag_ggn_mc", samples))


def kfac(samples: int = 1, *, approximation: str = "expand") -> KFAC:
    """Kronecker factors ``(A, G)`` per weight, ``G`` from ``samples`` sampled labels (needs key).

    Result: ``{layer path: {param: KroneckerFactors(a, g)}}`` over the layers
    with params, the path as in :attr:`fbp.nn.walk.Site.label` (``"0"``,
    ``"2.1"``). See the module docstring for the definitions.

    Args:
      samples: labels drawn per example.
      approximation: for weights shared over steps or positions (convolutions,
        recurrent and attention weights), ``"expand"`` (positions as extra
        examples) or ``"reduce"`` (each example's inputs averaged and output
        gradients summed over positions first) — Eschenhagen et al. (2023).
        The same for a dense layer on vectors.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(
      ...     quantities.value_grad_and(model, losses.softmax_cross_entropy, quantities.kfac()))
      >>> _, _, (k,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32), key=jax.random.key(1))
      >>> k["0"]["w"].a.shape, k["0"]["w"].g.shape
      ((4, 4), (3, 3))
    """
    return KFAC(_positive_int("kfac", samples), _approximation("kfac", approximation))


def kflr(*, approximation: str = "expand") -> KFLR:
    """Kronecker factors ``(A, G)`` per weight, ``G`` from the exact loss Hessian.

    Exact for one example on a dense layer: ``A ⊗ G`` is its GGN block. Same
    layout and ``approximation`` as :func:`kfac`; with ``"reduce"`` it is also
    exact for one example whose inputs are the same at every position.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(
      ...     quantities.value_grad_and(model, losses.softmax_cross_entropy, quantities.kflr()))
      >>> _, _, (k,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))
      >>> k["0"]["b"].a.shape
      (1, 1)
    """
    return KFLR(_approximation("kflr", approximation))


def clipped_grad(max_norm: float) -> ClippedGrad:
    """DP-SGD's clipped mean gradient from the same backward pass: a :class:`ClippedGradient`.

    ``Σ_n c_n g_n`` with ``c_n = min(1, C/‖∇ℓ_n‖)`` (Abadi et al., 2016): each
    example's gradient clipped to norm ``C`` and averaged. The norms come from
    the caches, and the clipped sum reweights each layer's pairs ``(a, g)`` —
    no second backward pass (Bu et al., 2023). Add the noise yourself
    (``σ·C/N·ξ``: ``fbp.diagnostics.gaussian_noise(key, grads, σ * C / N)``) and
    keep your privacy accounting.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(quantities.value_grad_and(
      ...     model, losses.softmax_cross_entropy, quantities.clipped_grad(0.1)))
      >>> _, _, (clipped,) = f(params, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))
      >>> clipped.norms.shape
      (5,)
    """
    bound = float(max_norm)
    if not bound > 0:
        raise ConfigError("clipped_grad", f"max_norm must be positive, got {max_norm!r}")
    return ClippedGrad(bound)


APPROXIMATIONS = ("expand", "reduce")
"""The Kronecker approximations of weights shared over positions (:func:`kfac`, :func:`kflr`)."""


def _approximation(name: str, value: Any) -> str:
    if value not in APPROXIMATIONS:
        raise ConfigError(name, f"approximation must be one of {APPROXIMATIONS}, got {value!r}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, f"samples must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------- per-layer reads


class _PerExample(NamedTuple):
    """What one leaf leaves for the first-order quantities: pairs, gradients or norms."""

    factors: dict | None  # {param key: (a, g)} from Extensions.outer_factors
    g: Params | None  # per-example gradients, leaves (N, *shape)
    sq: Params | None  # ‖g_n‖² per leaf, (N,)


def _refuse_mixing(visit: walk.Visit, what: str) -> None:
    reason = visit.layer.extensions and visit.layer.extensions.mixes_examples
    if reason and visit.train:
        raise ConfigError(
            visit.site.description,
            f"{what} does not exist in training: {reason}, so the loss of one example depends "
            "on the others. Use train=False (the running statistics make examples "
            "independent) or a model without it",
        )


def _outer_factors(visit: walk.Visit):
    ext = visit.layer.extensions
    return None if ext is None else ext.outer_factors


def _read_leaf(visit: walk.Visit, need_grads: bool) -> tuple[Params, jax.Array, _PerExample]:
    """The backward at a leaf with params, and what it leaves per example."""
    rule = _outer_factors(visit)
    if rule is not None:
        dparams, dx, factors = rule(visit.params, visit.cache, visit.dy)
        return dparams, dx, _PerExample(factors, None, None)
    if need_grads:
        dparams, dx, g = walk.batch_grad(visit)
        return dparams, dx, _PerExample(None, g, None)
    dparams, dx, sq = walk.batch_l2(visit)
    return dparams, dx, _PerExample(None, None, sq)


def _forms_grads(factors: dict, squares_of_sums: bool) -> bool:
    """Whether this leaf's quantities form each example's gradient ``Σ_t a_ntᵀ·g_nt`` anyway.

    Pairs over several steps or positions form them for the squares of sums
    (``sum_grad_squared``, ``variance``, ``batch_grad``) and, for the norms
    (``batch_l2``, the clipped sum's), where that is cheaper than the Gram
    form (see :func:`fbp.nn.dense.per_example_outer_sq_norms`) — then no
    larger than the pairs themselves. Otherwise the norms come from Gram
    matrices and the clipped sum from one reweighted product: DP-SGD on a
    transformer never holds a gradient per example. One-step pairs (a dense
    layer on vectors) never form them: Goodfellow's trick needs no product.
    """
    steps = {a.shape[1] for a, _ in factors.values()}
    if steps == {1}:
        return False
    if squares_of_sums:
        return True
    return all(
        a.shape[1] * (a.shape[-1] + g.shape[-1]) >= a.shape[-1] * g.shape[-1]
        for a, g in factors.values()
        if a.shape[-1] > 1
    )


def _grads_from_pairs(factors: dict, params: Params, dparams: Params) -> tuple[Params, _PerExample]:
    """Each example's gradient from the pairs, and the batch gradient as their sum.

    The sum replaces the rule's own ``dW = aᵀ·g`` product (the same
    arithmetic again), which XLA then drops as unused: forming the
    per-example gradients costs about what that product did. They are formed
    in float32 at least (:func:`_pair_grads`), so a bfloat16 layer's batch
    gradient is not rounded once per example before the sum.
    """
    g = {k: _pair_grads(a, d, params[k].shape) for k, (a, d) in factors.items()}
    summed = {k: v.sum(axis=0).astype(dparams[k].dtype) for k, v in g.items()}
    g = {k: v.astype(params[k].dtype) for k, v in g.items()}
    return {**dparams, **summed}, _PerExample(None, g, None)


def _pair_grads(a: jax.Array, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each example's ``Σ_t a_ntᵀ·g_nt``, reshaped to ``(N, *shape)``, in float32 at least
    (callers cast to the params' dtype)."""
    wide = jnp.promote_types(jnp.result_type(a, g), jnp.float32)
    return jnp.einsum("ntp,ntq->npq", a, g, preferred_element_type=wide).reshape(a.shape[0], *shape)


FUSED_OUTER_SIZE = 2048
"""Up to this many weight entries ``p·q``, :func:`_pair_sum_squared` sums outer products itself."""


def _pair_sum_squared(a: jax.Array, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``Σ_n (Σ_t a_ntᵀ·g_nt)²`` elementwise, reshaped to ``shape``.

    Several steps: each example's gradient is formed and squared. For a small
    weight (``p·q ≤ FUSED_OUTER_SIZE``, both sides wider than one) the ``T``
    outer products are summed elementwise inside the fusion that squares them:
    XLA's CPU backend runs a batched ``dot_general`` as one small product per
    example, and the fused sum measured 2.0–2.5× faster at the MNIST-1D CNN's
    and GRU's shapes (batch 256; slower at ``64 × 64``, and far slower with a
    side of one). Where the gradients are read more than once (their sum, their
    squares) :func:`_pair_grads`' product is kept: the fusion would be repeated.
    """
    if a.shape[1] == 1:
        return _squares_product(jnp.square(a[:, 0]), jnp.square(g[:, 0]), shape)
    p, q = a.shape[-1], g.shape[-1]
    if min(p, q) > 1 and p * q <= FUSED_OUTER_SIZE:
        per_example = jnp.sum(a[:, :, :, None] * g[:, :, None, :], axis=1)
        return jnp.sum(jnp.square(per_example), axis=0).reshape(shape)
    return jnp.sum(jnp.square(_pair_grads(a, g, shape)), axis=0)


def _squares_product(a2: jax.Array, g2: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``Σ_n a_n²·(g_n²)ᵀ``: one step's ``Σ_n (a_n g_nᵀ)²``, as ``(a_n g_nᵀ)² = a_n² (g_n²)ᵀ``."""
    if a2.shape[-1] == 1:  # a bias (a = 1): no product, a weighted sum
        return jnp.sum(a2 * g2, axis=0).reshape(shape)
    return jnp.einsum("np,nq->pq", a2, g2).reshape(shape)


def _leaf_grads(per: _PerExample, params: Params) -> Params:
    if per.g is not None:
        return per.g
    return {
        k: _pair_grads(a, g, params[k].shape).astype(params[k].dtype)
        for k, (a, g) in per.factors.items()
    }


def _leaf_sq(per: _PerExample) -> Params:
    if per.sq is not None:
        return per.sq
    if per.g is not None:
        return jax.tree.map(row_sq_norms, per.g)
    return {k: _pair_sq_norms(a, g) for k, (a, g) in per.factors.items()}


def _pair_sq_norms(a: jax.Array, g: jax.Array) -> jax.Array:
    """``‖Σ_t a_ntᵀ·g_nt‖²`` per example: ``‖a_n‖²·‖g_n‖²`` for one step (Goodfellow's trick)."""
    if a.shape[1] == 1:
        if a.shape[-1] == 1:  # a bias (a = 1)
            return jnp.square(a[:, 0, 0]) * row_sq_norms(g[:, 0])
        return row_sq_norms(a[:, 0]) * row_sq_norms(g[:, 0])
    return per_example_outer_sq_norms(a, g)[0]


def _leaf_sum_squared(per: _PerExample, params: Params) -> Params:
    if per.g is not None:
        return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), per.g)
    return {
        k: _pair_sum_squared(a, g, params[k].shape).astype(params[k].dtype)
        for k, (a, g) in per.factors.items()
    }


def _leaf_clipped(per: _PerExample, params: Params, c: jax.Array) -> Params:
    """``Σ_n c_n g_n``: each layer's pairs reweighted, ``aᵀ·(c ⊙ g)``."""
    if per.g is not None:
        return jax.tree.map(lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), per.g)
    out = {}
    for k, (a, g) in per.factors.items():
        # Flatten (n, t) into one contracted axis: aᵀ·(c ⊙ g), the backward's own dW product.
        a2 = a.reshape(-1, a.shape[-1])
        cg = (g * c.astype(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
        # A bias (a = 1) is a weighted sum, no product.
        bias = a.shape[-1] == 1
        summed = jnp.sum(a2 * cg, axis=0) if bias else jnp.einsum("np,nq->pq", a2, cg)
        out[k] = summed.reshape(params[k].shape).astype(params[k].dtype)
    return out


def _sum_uses(uses) -> Params:
    """The per-example gradient of params shared by several layers: the sum of their uses'."""
    gs = [g for _, g in uses]
    return jax.tree.map(lambda *g: sum(g[1:], g[0]), *gs)


def _check_factors(visit: walk.Visit, factors: dict) -> None:
    params = visit.params
    if not isinstance(params, dict) or set(factors) != set(params):
        raise ConfigError(
            visit.site.description,
            f"its outer_factors rule returned pairs for {sorted(factors)} but its params are "
            f"{sorted(params) if isinstance(params, dict) else type(params).__name__}; "
            "it must return one (a, g) pair per params entry",
        )


# --------------------------------------------------------------------------- loss Hessian factors


def hessian_factor(loss: Loss, pred: jax.Array, y: Any) -> jax.Array:
    """Columns ``S_n`` with ``S_n S_nᵀ = H_n``, the Hessian of ``ℓ_n`` in example ``n``'s output.

    ``ℓ_n`` is ``N·L`` as a function of example ``n``'s output (so that
    ``L = (1/N) Σ_n ℓ_n``): the loss of example ``n`` alone for a plain mean,
    and, where a mask's count normalises over the whole batch, that example's
    share of it. Returns an array of shape ``(K, *pred.shape)``: column ``k``
    of every example (``K`` columns). Softmax cross-entropy (integer labels or
    probabilities, over any positions, with or without a mask): ``diag(√p) −
    p·√pᵀ`` per position, times ``√(N·w_nt)`` (``w_nt`` the position's weight
    in the mean: ``1/√T`` for ``T`` positions unmasked); mean squared error
    over ``D`` outputs: ``√(2/D)·I``; sigmoid cross-entropy:
    ``diag(√(σ(1 − σ)/D))``. Any other loss: ``V·√max(Λ, 0)`` from the
    eigendecomposition of ``jax.hessian`` of ``N·loss.value`` in example
    ``n``'s output, the batch's other outputs held.

    Example:
      >>> import jax.numpy as jnp
      >>> from fbp import losses, quantities
      >>> ce = losses.softmax_cross_entropy
      >>> s = quantities.hessian_factor(ce, jnp.zeros((2, 3)), jnp.zeros(2, int))
      >>> s.shape
      (3, 2, 3)
    """
    batch = pred.shape[0]
    if loss is _losses.softmax_cross_entropy:
        classes = pred.shape[-1]
        positions = math.prod(pred.shape[1:-1])
        p = jax.nn.softmax(pred.reshape(batch, positions, classes), axis=-1)
        root = jnp.sqrt(p)
        # F[n, t, i, c] = δ_ic·√p_c − p_i·√p_c: F Fᵀ = diag(p) − ppᵀ (as Σ_c p_c = 1),
        # times √(N·w_nt), w_nt the position's weight in the mean (1/(N·T) unmasked).
        f = jnp.eye(classes, dtype=p.dtype)[None, None] * root[:, :, None, :]
        f = (f - p[:, :, :, None] * root[:, :, None, :]) * _position_scale(pred, y)[..., None, None]
        # Column (s, c) is F[:, s, :, c] at position s and zero elsewhere.
        cols = (
            jnp.eye(positions, dtype=p.dtype)[:, None, None, :, None]
            * jnp.transpose(f, (3, 0, 1, 2))[None]
        )
        return cols.reshape(positions * classes, *pred.shape)
    if loss is _losses.mse:
        size = math.prod(pred.shape[1:])
        eye = jnp.eye(size, dtype=pred.dtype) * math.sqrt(2 / size)
        cols = jnp.broadcast_to(eye[:, None, :], (size, batch, size))
        return cols.reshape(size, *pred.shape)
    if loss is _losses.sigmoid_binary_cross_entropy:
        size = math.prod(pred.shape[1:])
        s = jax.nn.sigmoid(pred.reshape(batch, size))
        root = jnp.sqrt(s * (1 - s) / size)
        cols = jnp.eye(size, dtype=pred.dtype)[:, None, :] * root[None, :, :]
        return cols.reshape(size, *pred.shape)
    return _eigen_factor(loss, pred, y)


def _position_scale(pred: jax.Array, y: Any) -> jax.Array:
    """``√(N·w_nt)`` for softmax cross-entropy, ``(N, T)``: ``w_nt`` each position's weight
    in the batch's mean (``1/(N·T)`` without a mask; with one, ``m_nt / Σ m``).

    ``ℓ_n = N·Σ_t w_nt ℓ_nt`` makes ``L = (1/N) Σ_n ℓ_n`` with a mask too, whose
    count is over the whole batch — so ``ℓ_n`` is not the loss of example ``n``
    on its own (that divides by its own count).
    """
    batch, classes = pred.shape[0], pred.shape[-1]
    positions = math.prod(pred.shape[1:-1])
    _, mask = _losses._split_target("softmax_cross_entropy", y)
    if mask is not None:
        mask = jnp.reshape(mask, (batch, positions))
    w = _losses._weights(pred.reshape(batch, positions, classes), mask)
    return jnp.sqrt(batch * w)


def _eigen_factor(loss: Loss, pred: jax.Array, y: Any) -> jax.Array:
    batch, size = pred.shape[0], math.prod(pred.shape[1:])

    def one(n):
        # ℓ_n = N·L as a function of example n's output alone (the others held):
        # the loss of example n for a mean, and right too when the loss normalises
        # over the whole batch (a mask's count), where slicing example n out is not.
        p_n = jax.lax.dynamic_index_in_dim(pred, n, keepdims=False)

        def ell(q):
            return batch * loss.value(jax.lax.dynamic_update_index_in_dim(pred, q, n, 0), y)

        h = jax.hessian(ell)(p_n).reshape(size, size)
        lam, v = jnp.linalg.eigh((h + h.T) / 2)
        return v * jnp.sqrt(jnp.maximum(lam, 0))[None, :]  # (size, K)

    s = jax.vmap(one)(jnp.arange(batch))  # (N, size, K)
    return jnp.transpose(s, (2, 0, 1)).reshape(size, *pred.shape)


def sampled_hessian_factor(loss: Loss, pred: jax.Array, y: Any, key: jax.Array, samples: int):
    """``samples`` random columns ``s`` with ``E[s sᵀ] = H_n``: shape ``(samples, *pred.shape)``.

    Each is ``√D·∇ℓ_n`` at a label drawn from the model's predictive
    distribution (``D`` the terms ``ℓ_n`` averages): a class from
    ``softmax(z)`` at every position (cross-entropy; with a mask, each
    position's ``p − e_label`` times ``√(N·w_nt)`` as in
    :func:`hessian_factor`), a bit from ``σ(z)``
    (sigmoid cross-entropy), a Gaussian label ``N(f, ½)`` per output (squared
    error, whose negative log-likelihood it is). Any other loss:
    ``S_n·ξ``, ``ξ ~ N(0, I)``, with :func:`hessian_factor`'s ``S_n``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import losses, quantities
      >>> ce, key = losses.softmax_cross_entropy, jax.random.key(0)
      >>> s = quantities.sampled_hessian_factor(ce, jnp.zeros((2, 3)), jnp.zeros(2, int), key, 4)
      >>> s.shape
      (4, 2, 3)
    """
    batch = pred.shape[0]
    if loss is _losses.softmax_cross_entropy:
        classes = pred.shape[-1]
        positions = math.prod(pred.shape[1:-1])
        logits = pred.reshape(batch, positions, classes)
        p = jax.nn.softmax(logits, axis=-1)
        labels = jax.random.categorical(key, logits, axis=-1, shape=(samples, batch, positions))
        s = p[None] - jax.nn.one_hot(labels, classes, dtype=p.dtype)
        s = s * _position_scale(pred, y)[None, :, :, None]
        return s.reshape(samples, *pred.shape)
    if loss is _losses.mse:
        size = math.prod(pred.shape[1:])
        noise = jax.random.normal(key, (samples, *pred.shape), pred.dtype)
        # ℓ_n's gradient at ŷ = f + ξ/√2 is (2/D)(f − ŷ) = −√2·ξ/D; times √D.
        return -math.sqrt(2 / size) * noise
    if loss is _losses.sigmoid_binary_cross_entropy:
        size = math.prod(pred.shape[1:])
        s = jax.nn.sigmoid(pred)
        bits = jax.random.bernoulli(key, s[None], (samples, *pred.shape)).astype(pred.dtype)
        return (s[None] - bits) / math.sqrt(size)
    factor = hessian_factor(loss, pred, y)  # (K, N, ...)
    noise = jax.random.normal(key, (samples, factor.shape[0]), pred.dtype)
    return jnp.tensordot(noise, factor, axes=1)


# --------------------------------------------------------------------------- curvature passes


def _kron_fallback_check(visit: walk.Visit, params: Params) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if leaf.size > MAX_FALLBACK_BLOCK:
            raise ConfigError(
                visit.site.description,
                f"declares no Extensions.outer_factors, so Kronecker factors fall back to the "
                f"whole GGN block of each param, but param {jax.tree_util.keystr(path)} has "
                f"{leaf.size} entries (more than MAX_FALLBACK_BLOCK = {MAX_FALLBACK_BLOCK}); "
                "declare outer_factors on the layer",
            )


def _curvature(model, params, tape, seeds, train, want_diag: bool, kron_modes: tuple = ()):
    """Send each column of ``seeds`` backward; per leaf, the GGN diagonal and Kronecker factors.

    ``kron_modes``: the approximations (``"expand"``, ``"reduce"``) whose factors
    are wanted; the result's second entry maps each to ``{site index: factors}``.
    """
    want_kron = bool(kron_modes)

    def block(g_leaf):
        flat = g_leaf.reshape(g_leaf.shape[0], -1)
        return flat.T @ flat

    def column(seed):
        diag, kron, tied, g_squared = {}, {}, {}, {}

        def leaf(visit: walk.Visit):
            _refuse_mixing(visit, "the generalised Gauss-Newton")
            if not jax.tree.leaves(visit.params):
                return visit.backward()
            rule = _outer_factors(visit)
            if visit.site.tied:  # shared params: the uses' g_n are added below
                if want_kron:
                    _kron_fallback_check(visit, visit.params)
                dparams, dx, g = walk.batch_grad(visit, adds_tied_uses=True)
                tied[visit.site.path] = (*tied.get(visit.site.path, ()), (visit.site.index, g))
                return dparams, dx
            if rule is not None:
                dparams, dx, factors = rule(visit.params, visit.cache, visit.dy)
                _check_factors(visit, factors)
                per = _PerExample(factors, None, None)
                for mode in kron_modes:
                    kron[mode, visit.site.index] = {
                        k: _output_factor(g, mode) for k, (_, g) in factors.items()
                    }
            else:
                dparams, dx, g = walk.batch_grad(visit)
                per = _PerExample(None, g, None)
                if want_kron:
                    _kron_fallback_check(visit, visit.params)
                    for mode in kron_modes:  # the whole block: no approximation to choose
                        kron[mode, visit.site.index] = jax.tree.map(block, g)
            if want_diag and per.factors is not None:
                # One-step pairs: Σ_c (a_n g_ncᵀ)² = a_n²·(Σ_c g_nc²)ᵀ, so the columns add
                # their g² here and the one product with a² follows the loop.
                one = {k: g for k, (a, g) in per.factors.items() if a.shape[1] == 1}
                g_squared[visit.site.index] = {k: jnp.square(g[:, 0]) for k, g in one.items()}
                rest = {k: pair for k, pair in per.factors.items() if k not in one}
                diag[visit.site.index] = _leaf_sum_squared(
                    _PerExample(rest, None, None), visit.params
                )
            elif want_diag:
                diag[visit.site.index] = _leaf_sum_squared(per, visit.params)
            return dparams, dx

        walk.backward(model, params, tape, seed, leaf, train=train)
        for uses in tied.values():
            total = _sum_uses(uses)
            if want_diag:
                diag[uses[0][0]] = jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), total)
            for mode in kron_modes:
                kron[mode, uses[0][0]] = jax.tree.map(block, total)
        return diag, kron, g_squared

    # The columns one after another (in chunks of 64 under vmap when there are many):
    # measured on the MNIST-1D CNN on CPU, vmapping all ten columns of a convolution's
    # backward was 9× slower than running them in turn.
    chunk = None if seeds.shape[0] <= 64 else 64
    diag, kron_g, g_squared = jax.lax.map(column, seeds, batch_size=chunk)
    diag, kron_g, g_squared = jax.tree.map(lambda d: d.sum(axis=0), (diag, kron_g, g_squared))
    inputs = _inputs(model, params, tape, seeds[0], train) if want_kron or g_squared else {}
    for index, squares in g_squared.items():
        pairs, leaf_params = inputs[index]
        for k, g2 in squares.items():
            a2 = jnp.square(pairs[k][:, 0])
            shape, dtype = leaf_params[k].shape, leaf_params[k].dtype
            diag[index][k] = _squares_product(a2, g2, shape).astype(dtype)
    kron = {mode: {} for mode in kron_modes}
    for (mode, index), gs in kron_g.items():
        if index in inputs:  # pairs: A from the inputs
            pairs = inputs[index][0]
            kron[mode][index] = {
                k: KroneckerFactors(_input_factor(pairs[k], mode), g) for k, g in gs.items()
            }
        else:  # the whole-block fallback: A = [[1]]
            kron[mode][index] = jax.tree.map(
                lambda g: KroneckerFactors(jnp.ones((1, 1), g.dtype), g), gs
            )
    return diag, kron


def _input_factor(a: jax.Array, mode: str) -> jax.Array:
    """``A`` from a weight's inputs ``a`` of shape ``(N, T, p)``.

    expand: ``(1/(N·T)) Σ_{n,t} a_nt a_ntᵀ``; reduce: ``(1/N) Σ_n ā_n ā_nᵀ`` with
    ``ā_n = (1/T) Σ_t a_nt``.
    """
    if mode == "reduce":
        mean = a.mean(axis=1)
        return _second_moment(mean, a.shape[0])
    return _second_moment(a.reshape(-1, a.shape[-1]), a.shape[0] * a.shape[1])


def _output_factor(g: jax.Array, mode: str) -> jax.Array:
    """One Hessian column's share of ``G`` from the propagated ``ĝ`` of shape ``(N, T, q)``.

    expand: ``Σ_{n,t} ĝ_nt ĝ_ntᵀ``; reduce: ``Σ_n (Σ_t ĝ_nt)(Σ_t ĝ_nt)ᵀ``.
    """
    if mode == "reduce":
        total = g.sum(axis=1)
        return _second_moment(total, 1)
    return _second_moment(g.reshape(-1, g.shape[-1]), 1)


def _second_moment(rows: jax.Array, count: int) -> jax.Array:
    """``rowsᵀ·rows / count``, the rows scaled before the product (``rows`` is the
    smaller side when there are fewer rows than columns)."""
    if count != 1:
        rows = rows * (1.0 / math.sqrt(count))
    return jnp.einsum("bn,bm->nm", rows, rows)


def _inputs(model, params, tape, seed, train) -> dict:
    """Each pair-declaring layer's inputs ``a`` (``{k: (N, T, p)}``) and params, by site index.

    ``a`` is read from the forward caches alone, so this walk's backward
    results are unused and compiled away: only the pairs' ``a`` are kept, for
    the Kronecker factor ``A`` (:func:`_input_factor`) and the one-step GGN
    diagonal ``(a²)ᵀ·Σ_c g_c²``, both outside the column loop.
    """
    inputs = {}

    def leaf(visit: walk.Visit):
        rule = _outer_factors(visit)
        if rule is None or visit.site.tied or not jax.tree.leaves(visit.params):
            return visit.backward()
        dparams, dx, factors = rule(visit.params, visit.cache, visit.dy)
        inputs[visit.site.index] = ({k: a for k, (a, _) in factors.items()}, visit.params)
        return dparams, dx

    walk.backward(model, params, tape, jnp.zeros_like(seed), leaf, train=train)
    return inputs


def _assemble(params: Params, sites, per_site: dict) -> Params:
    """A params-shaped tree with ``per_site[index]`` at each leaf layer's params path."""
    out = params
    for site in sites:
        if site.index in per_site:
            out = walk.replace_at(out, site.path, per_site[site.index])
    return out


# --------------------------------------------------------------------------- the driver


def value_grad_and(model: Layer, loss: Loss, *quantities: Quantity) -> Callable[..., tuple]:
    """Loss, gradient and the requested quantities, from one forward and one backward pass.

    Second-order quantities add one backward pass per Hessian column (exact:
    one per network output; Monte-Carlo: one per sample), run in turn with
    ``jax.lax.map``; the forward pass is shared.

    Args:
      model: the network (any layers; batch norm only with ``train=False``).
      loss: its loss, a mean over the batch (``L = (1/N) Σ_n ℓ_n``).
      *quantities: values from this module's factories, e.g. ``batch_l2()``,
        ``diag_ggn_mc(samples=4)``.

    Returns:
      ``f(params, x, y, *, key=None, train=True) -> (value, grads, results)``,
      ``results`` a tuple with one entry per quantity, in order (see the
      module docstring). ``key`` goes to the forward pass as in
      :func:`fbp.value_and_grad`; sampled quantities draw their labels from
      ``jax.random.fold_in(key, i)`` for the ``i``-th quantity, so they need
      it. Pure and jit-able.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities as q
      >>> model = nn.serial(nn.dense(8), nn.relu(), nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> f = jax.jit(q.value_grad_and(model, losses.softmax_cross_entropy, q.variance(), q.kflr()))
      >>> value, grads, (var, factors) = f(params, jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> var[2]["w"].shape, factors["2"]["w"].a.shape, factors["2"]["w"].g.shape
      ((8, 3), (8, 8), (3, 3))
    """
    _check(model, loss, "value_grad_and")
    for i, quantity in enumerate(quantities):
        if not isinstance(quantity, _FIRST_ORDER + _SECOND_ORDER):
            raise ConfigError(
                "value_grad_and",
                f"quantity {i} is a {type(quantity).__name__}, not a quantity; use this module's "
                "factories, e.g. fbp.quantities.batch_l2() (did you forget the call?)",
            )
    sites = walk.leaves(model)
    first = [q for q in quantities if isinstance(q, _FIRST_ORDER)]
    squares_of_sums = any(isinstance(q, BatchGrad | SumGradSquared | Variance) for q in first)
    need_grads = squares_of_sums or any(isinstance(q, ClippedGrad) for q in first)

    def f(params, x, y, *, key=None, train=True):
        pred, tape = walk.forward(model, params, x, key=key, train=train)
        value = loss.value(pred, y)
        dpred = loss.grad(pred, y)
        batch = pred.shape[0]
        per_site: dict[int, _PerExample] = {}

        def leaf(visit: walk.Visit):
            if not quantities:
                return walk.checked_backward(visit)
            _refuse_mixing(visit, "a per-example quantity")
            if not first or not jax.tree.leaves(visit.params):
                return walk.checked_backward(visit)
            if visit.site.tied:
                # Shared params (nn.tie): each use's g_n, added after the pass.
                dparams, dx, g = walk.batch_grad(visit, adds_tied_uses=True)
                walk.check_backward(visit, dparams, dx)
                tied[visit.site.path] = (*tied.get(visit.site.path, ()), (visit.site.index, g))
                return dparams, dx
            dparams, dx, per = _read_leaf(visit, need_grads)
            if per.factors is not None:
                _check_factors(visit, per.factors)
                if _forms_grads(per.factors, squares_of_sums):
                    dparams, per = _grads_from_pairs(per.factors, visit.params, dparams)
            walk.check_backward(visit, dparams, dx)
            per_site[visit.site.index] = (per, visit.params)
            return dparams, dx

        tied: dict = {}
        grads, _ = walk.backward(model, params, tape, dpred, leaf, train=train)
        for path, uses in tied.items():
            total = _sum_uses(uses)
            per_site[uses[0][0]] = (_PerExample(None, total, None), walk.at_path(params, path))

        def first_order(read):
            return _assemble(params, sites, {i: read(p, ps) for i, (p, ps) in per_site.items()})

        sum_squared = None
        if any(isinstance(q, SumGradSquared | Variance) for q in first):
            sum_squared = first_order(_leaf_sum_squared)
        results = []
        exact = None
        for i, quantity in enumerate(quantities):
            if isinstance(quantity, BatchGrad):
                results.append(first_order(_leaf_grads))
            elif isinstance(quantity, BatchL2):
                results.append(first_order(lambda p, ps: _leaf_sq(p)))
            elif isinstance(quantity, SumGradSquared):
                results.append(sum_squared)
            elif isinstance(quantity, Variance):
                results.append(
                    jax.tree.map(
                        lambda s, g: jnp.maximum(batch * s - jnp.square(g), 0), sum_squared, grads
                    )
                )
            elif isinstance(quantity, ClippedGrad):
                results.append(_clipped(params, sites, per_site, quantity.max_norm, batch, dpred))
            elif isinstance(quantity, DiagGGN | KFLR):
                if exact is None:
                    seeds = hessian_factor(loss, pred, y) / math.sqrt(batch)
                    want_diag = any(isinstance(q, DiagGGN) for q in quantities)
                    modes = sorted({q.approximation for q in quantities if isinstance(q, KFLR)})
                    exact = _curvature(model, params, tape, seeds, train, want_diag, tuple(modes))
                results.append(_second(quantity, exact, params, sites))
            else:  # DiagGGNMC | KFAC
                if key is None:
                    raise ConfigError(
                        "value_grad_and",
                        f"quantity {i} ({type(quantity).__name__}) samples labels and needs a "
                        "key; pass key=jax.random.key(...)",
                    )
                sampled = sampled_hessian_factor(
                    loss, pred, y, jax.random.fold_in(key, i), quantity.samples
                )
                seeds = sampled / math.sqrt(batch * quantity.samples)
                is_diag = isinstance(quantity, DiagGGNMC)
                modes = () if is_diag else (quantity.approximation,)
                out = _curvature(model, params, tape, seeds, train, is_diag, modes)
                results.append(_second(quantity, out, params, sites))
        return value, grads, tuple(results)

    return f


def _second(quantity, out, params, sites):
    diag, kron = out
    if isinstance(quantity, DiagGGN | DiagGGNMC):
        return _assemble(params, sites, diag)
    kron = kron[quantity.approximation]
    return {site.label: kron[site.index] for site in sites if site.index in kron}


def _clipped(params, sites, per_site, bound, batch, dpred) -> ClippedGradient:
    sq_terms = [jax.tree.leaves(_leaf_sq(per)) for per, _ in per_site.values()]
    sq_terms = [s for terms in sq_terms for s in terms]
    if sq_terms:
        norms = batch * jnp.sqrt(sum(sq_terms[1:], sq_terms[0]))
    else:
        norms = jnp.zeros((batch,), dpred.dtype)
    c = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-30))
    grads = _assemble(
        params, sites, {i: _leaf_clipped(per, ps, c) for i, (per, ps) in per_site.items()}
    )
    return ClippedGradient(grads, norms)


# --------------------------------------------------------------------------- Hessian-vector product


def hessian_vector_product(model: Layer, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, y, v, *, key=None, train=True) -> H·v``, ``H`` the loss's Hessian in params.

    Forward-mode differentiation of fbp's own backward pass: ``jax.jvp`` of
    :func:`fbp.grad` along ``v`` (params-shaped). About the cost of two
    gradients; no Hessian is formed.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn, losses, quantities
      >>> model = nn.serial(nn.dense(3))
      >>> params, _ = model.init(jax.random.key(0), (4,))
      >>> hvp = jax.jit(quantities.hessian_vector_product(model, losses.mse))
      >>> hv = hvp(params, jnp.ones((5, 4)), jnp.zeros((5, 3)), params)
      >>> hv[0]["w"].shape
      (4, 3)
    """
    _check(model, loss, "hessian_vector_product")
    gradient = grad(model, loss)

    def f(params, x, y, v, *, key=None, train=True):
        return jax.jvp(lambda p: gradient(p, x, y, key=key, train=train), (params,), (v,))[1]

    return f
