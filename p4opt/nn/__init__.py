"""Normalizing-flow layers built on P⁴Inv, with a RealNVP coupling for comparisons.

Every layer follows one convention, written down in :mod:`p4opt.nn.base`:
``forward``/``inverse`` are the plain maps, ``forward_and_log_det(x)`` and
``inverse_and_log_det(y)`` also return the per-sample log|det J| of the map in
that direction. ``layer.transform()`` is a :class:`torch.distributions.Transform`.
"""

from p4opt.nn import functional
from p4opt.nn.activations import BentIdentity, InverseBentIdentity
from p4opt.nn.base import Bijection, Flow
from p4opt.nn.conv import InvertibleConv1x1
from p4opt.nn.coupling import AffineCoupling, realnvp, realnvp_with_params
from p4opt.nn.distributions import BijectionTransform, flow_distribution
from p4opt.nn.linear import InvertibleLinear, random_orthogonal
from p4opt.nn.mixing import P4InvMixing, Permutation, swap_permutation
from p4opt.nn.stack import InvertibleLinearStack

__all__ = [
    "Bijection",
    "Flow",
    "InvertibleLinear",
    "InvertibleLinearStack",
    "InvertibleConv1x1",
    "BentIdentity",
    "InverseBentIdentity",
    "AffineCoupling",
    "realnvp",
    "realnvp_with_params",
    "Permutation",
    "P4InvMixing",
    "swap_permutation",
    "BijectionTransform",
    "flow_distribution",
    "random_orthogonal",
    "functional",
]
