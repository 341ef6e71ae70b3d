"""Embedding-delta parametrizations the optimizer searches (all batched over λ candidates).

- token weights: one multiplier per prompt token, A1111-style emphasis. AUTOMATIC1111
  multiplies hidden states by the weights and rescales the whole sequence to restore its
  mean; that ratio of means is unstable when the mean is near zero (and it moves the
  header), so here a weight scales the token's deviation from the sequence mean instead:
  h_i + (w_i - 1)(h_i - mean_j h_j). Weight 1 leaves a token as it is, 0 flattens it to
  the mean, 2 doubles its distinctiveness. Only prompt tokens are weighted.
- conditioning delta: an additive delta on the output sequence, sum_k c_k B_k, in a basis
  of K orthonormal (Frobenius) [L, D] elements with a zero header row, scaled so that
  coefficient 1 moves the sequence by its own norm (``distance`` 1).
- token vectors: N placeholder input embeddings, init + scale * sum_k c_nk v_k, in a
  K-dimensional orthonormal basis of the input-embedding space around an init word.
"""

from __future__ import annotations

import torch


def emphasis(hidden: torch.Tensor, weights: torch.Tensor, first: int = 1) -> torch.Tensor:
    """Token-weighted hidden states: hidden [λ|1, L, D], weights [λ, n] on positions first..first+n-1."""
    lam, n = weights.shape
    length = hidden.shape[1]
    ones = weights.new_ones(lam, 1).expand(lam, length)
    full = torch.cat([ones[:, :first], weights, ones[:, first + n:]], dim=1)
    mean = hidden.mean(1, keepdim=True)
    return hidden + (full - 1)[..., None] * (hidden - mean)


def delta_from_basis(coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """coeffs [λ, K] x basis [K, L, D] -> delta [λ, L, D]."""
    return torch.einsum("nk,kld->nld", coeffs, basis)


def random_orthonormal(k: int, dim: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """K seeded random orthonormal rows [k, dim] (QR of a Gaussian matrix), on ``like``'s device/dtype."""
    g = torch.randn(dim, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # unique QR: Haar-distributed directions
    return q.T.to(device=like.device, dtype=like.dtype)


def pca_directions(table: torch.Tensor, k: int) -> torch.Tensor:
    """Top-K principal directions [k, Din] of an embedding table [V, Din] (eigenvectors of its
    covariance, largest variance first, sign fixed so the largest component is positive)."""
    x = table.double()
    x = x - x.mean(0, keepdim=True)
    _, vecs = torch.linalg.eigh(x.T @ x)
    top = vecs[:, -k:].flip(-1).T  # [k, Din]
    sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    return (top * sign).to(table.dtype)


def _with_header(body: torch.Tensor) -> torch.Tensor:
    """[k, L-1, D] -> [k, L, D] with a zero header row."""
    return torch.cat([body.new_zeros(body.shape[0], 1, body.shape[2]), body], dim=1)


def _unit(basis: torch.Tensor) -> torch.Tensor:
    """Each [L, D] element scaled to Frobenius norm 1 (zero elements stay zero)."""
    norm = basis.flatten(1).norm(dim=1).clamp(min=1e-12)
    return basis / norm[:, None, None]


def image_basis(text: torch.Tensor, mapped: torch.Tensor, k: int) -> torch.Tensor:
    """Guide-image-minus-text directions [k, L, D]: the image-minus-text difference sequence
    (mapped [1, L, D] - text [1, L, D], header excluded) split along its K principal D-directions
    u_k: B_k = diff u_k u_k^T. Orthogonal; together they rebuild the difference's main part."""
    diff = (mapped - text)[0, 1:].double()
    _, _, vh = torch.linalg.svd(diff, full_matrices=False)
    u = vh[:k]  # [k, D]
    body = (diff @ u.T).T[:, :, None] * u[:, None, :]  # [k, L-1, D]
    return _unit(_with_header(body)).to(text.dtype)


def sequence_basis(directions: torch.Tensor, length: int) -> torch.Tensor:
    """Directions [k, D] applied uniformly to the non-header positions -> unit [k, L, D]."""
    body = directions[:, None, :].expand(-1, length - 1, -1)
    return _unit(_with_header(body))


def random_sequence_basis(k: int, length: int, dim: int, generator: torch.Generator,
                          like: torch.Tensor) -> torch.Tensor:
    """Seeded random orthonormal basis [k, L, D] with a zero header row."""
    body = random_orthonormal(k, (length - 1) * dim, generator, like).view(k, length - 1, dim)
    return _with_header(body)


def token_vectors(init: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor, scale: float) -> torch.Tensor:
    """Placeholder input embeddings [λ, N, Din] = init [N, Din] + scale * c [λ, N*K] . basis [K, Din]."""
    n, k = init.shape[0], basis.shape[0]
    return init + scale * (coeffs.view(-1, n, k) @ basis)


def insert_vectors(embeds: torch.Tensor, vectors: torch.Tensor, start: int) -> torch.Tensor:
    """Input embeddings [1, L, Din] with rows start..start+N-1 replaced by vectors [λ, N, Din] -> [λ, L, Din]."""
    lam, n = vectors.shape[:2]
    e = embeds.expand(lam, -1, -1)
    return torch.cat([e[:, :start], vectors, e[:, start + n:]], dim=1)
