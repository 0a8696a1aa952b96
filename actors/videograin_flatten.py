"""FLATTEN (Cong et al., ICLR 2024) as VideoGrain uses it: attention along optical-flow trajectories.

``trajectories`` turns the flow between consecutive frames into, for every latent position of every
frame, the positions of its trajectory in the other frames, at each UNet level, the way upstream's
``sample_trajectories_new`` does (including its quirks, which decide which positions attend to which):

- the flow (pixels at model size) is divided by ``max(H, W)``, nearest-resized to the level, multiplied by
  ``max(h, w)`` of the level and rounded half to even; position ``(t, i, j)`` links to
  ``(t + 1, i + fy, j + fx)`` when that lies inside the level;
- a position reached from several ones keeps one link (chosen at random upstream; here by a seeded
  generator) and the others end their trajectory there;
- a trajectory can only *start* at ``(t, x // h, x % h)`` for ``x < h w`` (upstream enumerates positions
  that way): with ``w > h`` positions in columns ``>= h`` join a trajectory only when one reaches them;
- each query keeps itself plus the last ``T - 1`` entries of upstream's key sequence (its trajectory in the
  other frames, time-ordered, padded; when no trajectory spans all ``T`` frames the tail of its spatial
  neighbourhood window fills the front, as upstream's slicing does).

``flatten_attention`` then lets each query attend over those ``T`` keys (masked), per head.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

_DEAD = (-1, -1, -1)


def _links(flow: torch.Tensor, h: int, w: int, rng: random.Random) -> dict[tuple, tuple]:
    """``flow [T-1, 2, h, w]`` (integer pixels of the level) -> ``{(t, i, j): (t + 1, i', j') or _DEAD}``."""
    links: dict[tuple, tuple] = {}
    fl = flow.to(torch.int64).tolist()
    for t, ft in enumerate(fl):
        for i in range(h):
            for j in range(w):
                x, y = i + ft[1][i][j], j + ft[0][i][j]
                if 0 <= x < h and 0 <= y < w:
                    links[(t, i, j)] = (t + 1, x, y)
    sources: dict[tuple, list[tuple]] = {}
    for p, q in links.items():
        sources.setdefault(q, []).append(p)
    for ps in sources.values():
        if len(ps) > 1:
            ps = list(ps)
            ps.pop(rng.randint(0, len(ps) - 1))  # this one keeps its link
            for p in ps:
                links[p] = _DEAD
    return links


def _chains(links: dict[tuple, tuple], frames: int, h: int, w: int) -> list[list[tuple]]:
    """Trajectories of two or more positions, plus every position in none as its own."""
    done: list[list[tuple]] = []
    active: list[list[tuple]] = []
    for t in range(frames):
        reached = set()
        kept = []
        for tr in active:
            if tr[-1] in links:
                tr.append(links[tr[-1]])
                reached.add(tr[-1])
                kept.append(tr)
            else:
                done.append(tr)
        starts = [(t, x // h, x % h) for x in range(h * w)]
        active = kept + [[p] for p in starts if p not in reached]
    done += active
    useful = [tr[:-1] if tr[-1] == _DEAD else tr for tr in done if len(tr) > 1]
    seen = {p for tr in useful for p in tr}
    useful += [[(t, i, j)] for t in range(frames) for i in range(h) for j in range(w) if (t, i, j) not in seen]
    return useful


def _neighbours(t: int, i: int, j: int, r: int, h: int, w: int) -> list[tuple]:
    return [(t, i + a, j + b) for a in range(-r, r + 1) for b in range(-r, r + 1)
            if (a or b) and 0 <= i + a < h and 0 <= j + b < w]


def trajectories(flow: torch.Tensor, levels: list[tuple[int, int]], latent_hw: tuple[int, int], seed: int = 0
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``flow [T-1, 2, H, W]`` (frame t -> t+1, x then y, pixels at model size ``H x W``) ->
    ``{h w: (index int64 [T h w, T], mask bool [T h w, T])}`` for each level ``(h, w)``: the flat positions
    ``t' h w + i' w + j'`` each query attends to (entry 0: itself)."""
    frames = flow.shape[0] + 1
    big_h, big_w = flow.shape[-2:]
    rng = random.Random(seed)
    scaled = flow.float() / max(big_h, big_w)
    out = {}
    for h, w in levels:
        window = 2 if (h, w) == tuple(latent_hw) else 1  # upstream's neighbourhood: 5x5 at the latent size
        fl = torch.round(max(h, w) * F.interpolate(scaled, scale_factor=(h / big_h, w / big_w)))
        chains = _chains(_links(fl, h, w, rng), frames, h, w)
        longest = max(len(c) for c in chains)
        side = (2 * window + 1) ** 2
        tail = min(frames - 1, side + longest - 1)  # upstream slices the last T - 1 of a shorter sequence whole
        owner = {p: c for c in chains for p in c}
        index = torch.zeros(frames * h * w, 1 + tail, dtype=torch.int64)
        mask = torch.zeros(frames * h * w, 1 + tail, dtype=torch.bool)
        for t in range(frames):
            for i in range(h):
                for j in range(w):
                    me = (t, i, j)
                    near = [me] + _neighbours(t, i, j, window, h, w)
                    seq = near + [None] * (side - len(near))
                    others = [p for p in owner[me] if p != me]
                    seq += others + [None] * (longest - 1 - len(others))
                    row = t * h * w + i * w + j
                    for col, p in enumerate([me] + seq[len(seq) - tail:]):
                        if p is not None:
                            index[row, col] = p[0] * h * w + p[1] * w + p[2]
                            mask[row, col] = True
        out[h * w] = (index, mask)
    return out


def flatten_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
                      heads: int, chunk: int = 1 << 26) -> torch.Tensor:
    """``q, k, v [B, T n, C]``: query ``p`` attends, per head, over keys/values ``index[p]`` where ``mask[p]``."""
    b, m, c = q.shape
    d = c // heads
    kk = index.shape[1]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask.to(q.device), -math.inf)
    index = index.to(q.device)
    out = torch.empty_like(v)
    step = max(1, chunk // max(1, b * kk * c))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        ix = index[lo:hi]
        qc = q[:, lo:hi].reshape(b, hi - lo, heads, 1, d)  # [B, c, H, 1, d]
        kc = k[:, ix].reshape(b, hi - lo, kk, heads, d).permute(0, 1, 3, 2, 4)  # [B, c, H, K, d]
        vc = v[:, ix].reshape(b, hi - lo, kk, heads, d).permute(0, 1, 3, 2, 4)
        s = qc @ kc.transpose(-2, -1) / math.sqrt(d) + bias[lo:hi, None, None, :]
        out[:, lo:hi] = (s.softmax(-1) @ vc).reshape(b, hi - lo, c)
    return out
