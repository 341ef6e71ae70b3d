"""Embedding-delta parametrizations the optimizer searches (all batched over λ candidates).

- token weights: one multiplier per prompt token, A1111-style emphasis. AUTOMATIC1111
  multiplies hidden states by the weights and rescales the whole sequence to restore its
  mean; that ratio of means is unstable when the mean is near zero (and it moves the
  header), so here a weight scales the token's deviation from the sequence mean instead:
  h_i + (w_i - 1)(h_i - mean_j h_j). Weight 1 leaves a token as it is, 0 flattens it to
  the mean, 2 doubles its distinctiveness. Only prompt tokens are weighted.
- conditioning delta: an additive delta on the output sequence, sum_k c_k B_k, in a basis
  of K orthonormal (Frobenius) [L, D] elements with a zero header row, scaled so that
  coefficient 1 moves the sequence by its own norm (``distance`` 1). SDXL: each element
  has a pooled part [P] too, orthonormal jointly with its sequence part (:class:`DeltaBasis`).
- token vectors: N placeholder input embeddings, init + scale * sum_k c_nk v_k, in a
  K-dimensional orthonormal basis of the input-embedding space around an init word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def emphasis(hidden: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token-weighted hidden states: hidden [λ|1, L, D], weights [λ, n] of the tokens at
    sequence positions ``positions`` [n] (the others keep weight 1)."""
    full = weights.new_ones(weights.shape[0], hidden.shape[1])
    full[:, positions.to(full.device)] = weights
    mean = hidden.mean(1, keepdim=True)
    return hidden + (full - 1)[..., None] * (hidden - mean)


@dataclass
class DeltaBasis:
    """The delta's basis: sequence [K, L, D] and (SDXL) pooled [K, P] parts of each element."""

    sequence: torch.Tensor
    pooled: torch.Tensor | None = None

    def scaled(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> DeltaBasis:
        """Unit elements scaled by the norm of the plain conditioning (sequence and pooled)."""
        norm = hidden.norm() if pooled is None else torch.cat([hidden.flatten(), pooled.flatten()]).norm()
        return DeltaBasis(self.sequence * norm, None if self.pooled is None else self.pooled * norm)


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


def headers(length: int, window: int | None = None, device=None) -> torch.Tensor:
    """Bool [L]: the chunks' header (BOS) positions, every ``window`` (default: position 0 only)."""
    return torch.arange(length, device=device) % (window or length) == 0


def _with_header(body: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[k, L-c, D] -> [k, L, D] with zero rows at the c chunks' headers (every ``window``
    positions; default: one chunk, header at 0)."""
    window = window or body.shape[1] + 1
    length = body.shape[1] * window // (window - 1)
    out = body.new_zeros(body.shape[0], length, body.shape[2])
    out[:, ~headers(length, window, body.device)] = body
    return out


def _unit(basis: torch.Tensor) -> torch.Tensor:
    """Each [L, D] element scaled to Frobenius norm 1 (zero elements stay zero)."""
    norm = basis.flatten(1).norm(dim=1).clamp(min=1e-12)
    return basis / norm[:, None, None]


def image_basis(text: torch.Tensor, mapped: torch.Tensor, k: int, window: int | None = None) -> torch.Tensor:
    """Guide-image-minus-text directions [k, L, D]: the image-minus-text difference sequence
    (mapped [1, L, D] - text [1, L, D], headers excluded) split along its K principal D-directions
    u_k: B_k = diff u_k u_k^T. Orthogonal; together they rebuild the difference's main part."""
    diff = (mapped - text)[0, ~headers(text.shape[1], window, text.device)].double()
    _, _, vh = torch.linalg.svd(diff, full_matrices=False)
    u = vh[:k]  # [k, D]
    body = (diff @ u.T).T[:, :, None] * u[:, None, :]  # [k, L-c, D]
    return _unit(_with_header(body, window)).to(text.dtype)


def sequence_basis(directions: torch.Tensor, length: int, window: int | None = None) -> torch.Tensor:
    """Directions [k, D] applied uniformly to the non-header positions -> unit [k, L, D]."""
    body = directions[:, None, :].expand(-1, int((~headers(length, window)).sum()), -1)
    return _unit(_with_header(body, window))


def random_sequence_basis(k: int, length: int, dim: int, generator: torch.Generator,
                          like: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Seeded random orthonormal basis [k, L, D] with zero header rows."""
    rows = int((~headers(length, window)).sum())
    body = random_orthonormal(k, rows * dim, generator, like).view(k, rows, dim)
    return _with_header(body, window)


def random_joint_basis(k: int, length: int, dim: int, pooled_dim: int, generator: torch.Generator,
                       like: torch.Tensor, window: int | None = None) -> DeltaBasis:
    """Seeded random orthonormal elements over the sequence (zero header rows) and the pooled
    vector together: [k, L, D] and [k, P]."""
    rows = int((~headers(length, window)).sum())
    flat = random_orthonormal(k, rows * dim + pooled_dim, generator, like)
    body, pooled = flat[:, :rows * dim], flat[:, rows * dim:]
    return DeltaBasis(_with_header(body.reshape(k, rows, dim), window), pooled)


def pooled_directions(part: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Each element's pooled counterpart [k, P]: its mean row in the second encoder's features
    (part [k, L, D2]) through that encoder's text projection (weight [P, D2]), the linear map
    from its final states to the pooled vector."""
    return part.mean(1) @ projection.T.to(part)


def with_pooled(sequence: torch.Tensor, pooled: torch.Tensor) -> DeltaBasis:
    """Elements (sequence [k, L, D], pooled [k, P]) made orthonormal jointly (QR in element
    order: the first keeps its direction; signs fixed so each keeps its orientation)."""
    k, shape = len(sequence), sequence.shape[1:]
    joint = torch.cat([sequence.flatten(1), pooled], dim=1).double()
    q, r = torch.linalg.qr(joint.T)
    q = (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1)).T.to(sequence.dtype)
    return DeltaBasis(q[:, :shape.numel()].reshape(k, *shape), q[:, shape.numel():])


def token_vectors(init: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor, scale: float) -> torch.Tensor:
    """Placeholder input embeddings [λ, N, Din] = init [N, Din] + scale * c [λ, N*K] . basis [K, Din]."""
    n, k = init.shape[0], basis.shape[0]
    return init + scale * (coeffs.view(-1, n, k) @ basis)


def insert_vectors(embeds: torch.Tensor, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Input embeddings [1, L, Din] with the rows at ``positions`` [N] replaced by vectors
    [λ, N, Din] -> [λ, L, Din]."""
    out = embeds.expand(len(vectors), -1, -1).clone()
    out[:, positions] = vectors.to(out)
    return out
