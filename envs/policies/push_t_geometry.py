"""Geometry for the scripted Push-T pusher: push points on the T, segment clearance, paths around the block.

Example:
    >>> import numpy as np
    >>> from envs.policies.push_t_geometry import segment_clearance, shortest_paths
    >>> pose = np.array([256.0, 256.0, 0.0])  # block x, y, angle
    >>> float(segment_clearance(np.array([[100.0, 256.0]]), np.array([[400.0, 256.0]]), pose)[0])  # crosses the T
    0.0
    >>> length, first = shortest_paths(np.array([100.0, 256.0]), np.array([[400.0, 256.0]]), pose, clear=17.0)
    >>> bool(length[0] > 300.0)  # around the block, not through it
    True

All in world px; a block pose is (x, y, angle) of the T's centre of mass (`envs.push_t_physics`).
"""
from __future__ import annotations

import math

import numpy as np

from envs.push_t_physics import AGENT_RADIUS, T_BOXES, T_OUTLINE, T_RADIUS, WALL, WORLD_SIZE, block_distance


def push_candidates(spacing: float = 12.0, end_margin: float = 6.0):
    """Push points on the T outline (body frame) and the inward normals there: (C, 2), (C, 2)."""
    points, normals = [], []
    for v0, v1 in zip(T_OUTLINE, np.roll(T_OUTLINE, -1, axis=0)):
        length = float(np.linalg.norm(v1 - v0))
        u = (v1 - v0) / length
        k = max(1, int((length - 2 * end_margin) // spacing) + 1)
        for s in np.linspace(end_margin, length - end_margin, k) if k > 1 else [length / 2]:
            points.append(v0 + s * u)
            normals.append([-u[1], u[0]])  # the outline runs so that (-dy, dx) points inside
    return np.array(points), np.array(normals)


CANDIDATE_POINTS, CANDIDATE_NORMALS = push_candidates()


def rotate(v, angle: float) -> np.ndarray:
    """Rotate vectors (..., 2) by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


_BOXES = [(np.array([x0, y0]), np.array([x1, y1]), np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
          for x0, x1, y0, y1 in T_BOXES]  # (low corner, high corner, 4 corners) of the bar and the stem


def segment_clearance(a, b, pose) -> np.ndarray:
    """Distance (M,) between segments a->b ((M, 2) world points each) and the T at pose; 0 if they cross."""
    a = rotate(np.asarray(a, dtype=np.float64) - pose[:2], -pose[2])  # (M, 2) body frame
    d = rotate(np.asarray(b, dtype=np.float64) - pose[:2], -pose[2]) - a  # (M, 2)
    d = np.where(np.abs(d) < 1e-9, 1e-9, d)  # keeps the slab test finite for axis-parallel segments
    dd = (d * d).sum(1)
    best = np.full(len(a), np.inf)
    for lo, hi, corners in _BOXES:  # a segment misses a convex box: closest at an endpoint or a box corner
        ta, tb = (lo - a) / d, (hi - a) / d  # (M, 2) slab entry/exit parameters
        t0 = np.maximum(np.minimum(ta, tb).max(1), 0.0)
        t1 = np.minimum(np.maximum(ta, tb).min(1), 1.0)
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        qa = np.maximum(np.abs(a - centre) - half, 0.0)
        qb = np.maximum(np.abs(a + d - centre) - half, 0.0)
        dist2 = np.minimum((qa * qa).sum(1), (qb * qb).sum(1))
        t = np.clip(((corners[None] - a[:, None]) * d[:, None]).sum(-1) / dd[:, None], 0.0, 1.0)  # (M, 4)
        gap = a[:, None] + t[..., None] * d[:, None] - corners[None]  # (M, 4, 2)
        dist2 = np.minimum(dist2, (gap * gap).sum(-1).min(1))
        best = np.minimum(best, np.where(t0 <= t1, 0.0, np.sqrt(dist2)))
    return best


def shortest_paths(agent, targets, pose, clear: float, ring: int = 12):
    """Lengths (M,) of the shortest paths from agent to each target (M, 2) that keep `clear` px from the
    T (inf: none), and the first waypoint (M, 2) of each.

    Graph: the agent, the targets and `ring` points on a circle around the block that clears it;
    edges are straight segments that stay clear (an agent already closer to the T must get no
    closer); Dijkstra from the agent on this small dense graph.
    """
    lo, hi = WALL + AGENT_RADIUS, WORLD_SIZE - WALL - AGENT_RADIUS
    phi = pose[2] + np.arange(ring) * (2 * np.pi / ring)
    orbit = pose[:2] + (T_RADIUS + clear + 6.0) * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    orbit = orbit[np.all((orbit >= lo) & (orbit <= hi), axis=1)]
    nodes = np.concatenate([agent[None], targets, orbit])  # (n, 2): agent, M targets, ring points
    n, m = len(nodes), len(targets)
    i_idx, j_idx = np.triu_indices(n, k=1)
    seg = segment_clearance(nodes[i_idx], nodes[j_idx], pose)
    ok = seg >= np.where(i_idx == 0, min(clear, float(block_distance(agent, pose)) - 0.5), clear)
    cost = np.full((n, n), np.inf)
    length = np.linalg.norm(nodes[i_idx] - nodes[j_idx], axis=1)
    cost[i_idx[ok], j_idx[ok]] = cost[j_idx[ok], i_idx[ok]] = length[ok]
    dist, prev, done = np.full(n, np.inf), np.full(n, -1), np.zeros(n, dtype=bool)
    dist[0] = 0.0
    for _ in range(n):
        u = int(np.argmin(np.where(done, np.inf, dist)))
        if not np.isfinite(dist[u]):
            break
        done[u] = True
        better = dist[u] + cost[u] < dist
        dist[better], prev[better] = dist[u] + cost[u][better], u
    first = np.array(targets, dtype=np.float64, copy=True)
    for j in range(1, m + 1):
        node = j
        while np.isfinite(dist[j]) and prev[node] != 0:
            node = prev[node]
        first[j - 1] = nodes[node]
    return dist[1 : m + 1], first
