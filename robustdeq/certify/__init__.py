"""Certificates for DEQs: what is guaranteed about existence, stability and robustness.

=========================  ================================================================
``contraction_certificate``  global Lip_z bound of the cell (sound), monotone condition,
                             which solvers are then guaranteed to converge
``local_stability``          per sample ||J||_2 and rho(J) of df/dz at z* (dense or JVP/VJP)
``lyapunov_decrease``        V(z_{k+1}) < V(z_k) along recorded trajectories, with margins
``lipschitz_bound``          sound Lip(x -> logits) for contractive / monotone / linear DEQs
``certified_radius``         per-sample certified L2 radius from logit margins
``ibp_certify``              Linf certificate by interval bounds through the fixed point
``certify``                  all of the above that apply -> ``CertReport`` (JSON, Markdown)
``certify_feedforward``      Linf certificates of a feed-forward network by IBP through its
                             layers (what ``certify`` does for one) -> ``CertReport``
``certify_checkpoint``       load a checkpoint, certify it on a dataset split (``method``:
                             deterministic or smoothing), save the report
``smoothing.certify``        Gaussian randomized smoothing (Cohen et al. 2019) and its serialized
                             warm-started variant SRS (Gao et al. 2024) -> ``SmoothingReport``
=========================  ================================================================
"""
from ._util import require_deq
from .api import METHODS, certify, certify_checkpoint
from .config import CertifyConfig
from ..deq.contraction import ContractionCertificate, contraction_certificate, solver_guarantees
from .ibp import IBPResult, ibp_certify
from .feedforward import certify_feedforward
from ..deq.linalg import NormBound, spectral_norm_bound
from .lipschitz import LipschitzBound, RadiusResult, certified_radius, lipschitz_bound
from .local import LocalStability, jacobian_spectrum, local_stability
from .lyapunov import LyapunovResult, lyapunov_decrease, quadratic_candidate
from .oracles import linear_deq
from .report import CertReport, CertResult
from . import smoothing
from .smoothing import SmoothingConfig, SmoothingReport, SmoothingResult

__all__ = [
    "require_deq", "certify", "certify_checkpoint", "CertifyConfig", "METHODS", "CertReport", "CertResult",
    "ContractionCertificate", "contraction_certificate", "solver_guarantees",
    "LocalStability", "local_stability", "jacobian_spectrum",
    "LyapunovResult", "lyapunov_decrease", "quadratic_candidate",
    "LipschitzBound", "RadiusResult", "lipschitz_bound", "certified_radius",
    "IBPResult", "ibp_certify", "certify_feedforward", "NormBound", "spectral_norm_bound",
    "linear_deq",
    "smoothing", "SmoothingConfig", "SmoothingReport", "SmoothingResult",
]
