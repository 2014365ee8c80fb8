"""EigenCAM (Muhammad and Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN
2020)."""

from __future__ import annotations

from .. import decomcam as dc
from .base import register
from .base_cam import BaseCam


def principal_projection(be, m):
    """m [B, C, h, w] -> [B, h, w]: the positions' projection on the first principal axis of m viewed as
    hw samples of C features, centred over positions (pytorch-grad-cam's get_2d_projection). From the
    [hw, hw] Gram matrix of the centred X: X v_1 = sigma_1 u_1. The sign is fixed: positive dot product
    with the channel sum of m (else the largest-magnitude entry positive), runtime.decomcam's rule."""
    xp = be.xp
    b, c, h, w = m.shape
    x = m.astype(xp.float64).reshape(b, c, h * w).transpose(0, 2, 1)    # [B, n, C]
    xc = x - x.mean(axis=1, keepdims=True)
    lam, vec = be.eigh(xp.matmul(xc, xc.transpose(0, 2, 1)))            # ascending
    proj = vec[:, :, -1] * xp.sqrt(xp.clip(lam[:, -1:], 0.0, None))     # [B, n]
    proj = dc._orient(xp, proj[:, None, :], x.sum(axis=2))[:, 0]
    return proj.reshape(b, h, w)


@register
class EigenCam(BaseCam):
    """Paper: L = ReLU(projection of the activations on their first principal component), as
    pytorch-grad-cam computes it (centred; the paper's SVD of the raw activations differs by the centring).
    Gradient-free, class-agnostic. pytorch-grad-cam leaves the sign of the component to LAPACK; ours is
    fixed (see principal_projection)."""

    name = "eigencam"
    doc = "EigenCAM: first principal component of the activations"
    needs_gradients = False

    def cam(self, ctx):
        return principal_projection(ctx.backend, ctx.activations)
