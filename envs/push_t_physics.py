"""Push-T physics: the T geometry, the success test and one pymunk simulation (`PushTSim`).

Example:
    >>> import numpy as np
    >>> from envs.push_t_physics import PushTSim, is_success
    >>> sim = PushTSim(np.array([100.0, 256.0, 256.0, 256.0, 0.0, 0.0, 0.0]))  # agent xy, block xy, angle, agent vel
    >>> sim.step(1.0, 0.0)  # one control step (0.1 s): the agent heads for agent + (100, 0)
    >>> sim.state().shape, bool(is_success(sim.state(), sim.state())[0])
    ((7,), True)

Facts (the reference implementation's environment): a 512 x 512 world without gravity, static walls at the border, a
kinematic agent circle of radius 15, a T-block of mass 1 (a 120 x 30 bar over a 30 x 90 stem,
friction 1). Control at 10 Hz with 10 sub-steps of dt = 0.01; target = agent + 100 a; PD
accel = 100 (target - pos) + 20 (0 - vel) integrated into the agent's velocity every sub-step.
With `damping=0` the space removes the block's velocity at every sub-step, so the block moves only
while it is pushed and rests as soon as contact ends. While it is pushed, pymunk moves it by the
velocity the contact solver left it in the previous sub-step (positions are updated before the
damping), so a control step can end with the block in motion: that velocity is not part of the
7-number state, and an env set to a state mid-push (`set_state`, `reset_to`: the block at rest)
can drift from the env that reached it by pushing (median 0.3 px, at times over 10 px, after one
step of the `contact` policy); `clone_sim` copies the velocity too.

Guards keep a kinematic (infinitely strong) agent physical, chiefly when it pins the block
against a wall: the PD target (and the agent) stay inside the walls; a block squeezed into a wall
is moved back out (`WALL_SLOP`); an agent sinking into the block by more than `MAX_OVERLAP` is
stopped (position and velocity into the block removed), as a jammed block would stop a pusher
(except where the block pins the agent against a wall: the wall wins, and the agent can sink deeper);
and the block never moves faster than 1.5 x its pusher (a wedged block could otherwise be flung).
"""
from __future__ import annotations

import math

import numpy as np
import pymunk

WORLD_SIZE = 512.0
WALL = 5.0  # inner faces of the border walls sit at WALL and WORLD_SIZE - WALL
AGENT_RADIUS = 15.0
ACTION_SCALE = 100.0  # target = agent + ACTION_SCALE * action
KP, KD = 100.0, 20.0  # PD gains on the agent
DT, SUBSTEPS = 0.01, 10  # 10 Hz control
MAX_OVERLAP = 3.0  # px the agent may sink into the block before it is stopped
WALL_SLOP = 1.0  # px the block may sink into a wall before it is moved back
SUCCESS_POS, SUCCESS_ANGLE = 20.0, math.pi / 9

# The T in body coordinates, origin at its centre of mass: bar 120 x 30 on top of a 30 x 90 stem.
_BAR_AREA, _STEM_AREA = 120.0 * 30.0, 30.0 * 90.0
_COM_Y = (_BAR_AREA * 15.0 + _STEM_AREA * 75.0) / (_BAR_AREA + _STEM_AREA)
T_BOXES = np.array([[-60.0, 60.0, 0.0, 30.0], [-15.0, 15.0, 30.0, 120.0]]) - [0, 0, _COM_Y, _COM_Y]  # x0 x1 y0 y1
T_OUTLINE = np.array(
    [[-60, 0], [60, 0], [60, 30], [15, 30], [15, 120], [-15, 120], [-15, 30], [-60, 30]], dtype=np.float64
) - [0.0, _COM_Y]  # (8, 2) boundary, in the order that makes (-dy, dx) of each edge point inside
T_RADIUS = float(np.linalg.norm(T_OUTLINE, axis=1).max())  # the T fits in this circle around its centre of mass
_BOX_CENTRES = [((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2) for x0, x1, y0, y1 in T_BOXES]
_MIN_LEVER = 20.0  # px: caps the block's spin at (speed limit) / _MIN_LEVER (see _limit_block_speed)
_NEAR2 = (AGENT_RADIUS + T_RADIUS + 1.0) ** 2  # closer than this (squared) the agent may touch the T
_NEAR_WALL = WALL + T_RADIUS + 1.0  # closer than this to the border the T may touch a wall
_LO, _HI = WALL + AGENT_RADIUS, WORLD_SIZE - WALL - AGENT_RADIUS  # range of the agent's centre


def wrap_angle(angle):
    """Wrap angles to [-pi, pi)."""
    wrapped = (np.asarray(angle, dtype=np.float64) + np.pi) % (2 * np.pi) - np.pi
    # an angle just below -pi rounds to 2 pi in the modulo, so to +pi here
    return wrapped - 2 * np.pi * (wrapped >= np.pi)


def block_polygon(pose) -> np.ndarray:
    """World coordinates (8, 2) of the T outline for a block pose (x, y, angle)."""
    c, s = math.cos(pose[2]), math.sin(pose[2])
    return T_OUTLINE @ np.array([[c, s], [-s, c]]) + np.asarray(pose[:2], dtype=np.float64)


def block_distance(points, pose) -> np.ndarray:
    """Signed distance (...,) from world points (..., 2) to the T of pose (x, y, angle); negative inside."""
    c, s = math.cos(pose[2]), math.sin(pose[2])
    d = np.asarray(points, dtype=np.float64) - np.asarray(pose[:2], dtype=np.float64)
    local = np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)  # (..., 2) body frame
    dist = np.full(local.shape[:-1], np.inf)
    for x0, x1, y0, y1 in T_BOXES:  # distance to a union of boxes = min over the boxes (exact outside)
        q = np.abs(local - [(x0 + x1) / 2, (y0 + y1) / 2]) - [(x1 - x0) / 2, (y1 - y0) / 2]
        box = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)
        dist = np.minimum(dist, box)
    return dist


def pose_error(states, goals) -> tuple[np.ndarray, np.ndarray]:
    """(position error, |angle error|) of states (N, 7) against goals (N, 7), as in the success test."""
    states, goals = np.atleast_2d(states), np.atleast_2d(goals)
    pos = np.linalg.norm(states[:, :4] - goals[:, :4], axis=1)  # of the 4-vector (agent xy, block xy)
    return pos, np.abs(wrap_angle(states[:, 4] - goals[:, 4]))


def is_success(states, goals) -> np.ndarray:
    """The LeWM paper's success test: pose error < 20 px and wrapped block angle error < pi/9."""
    pos, ang = pose_error(states, goals)
    return (pos < SUCCESS_POS) & (ang < SUCCESS_ANGLE)


class PushTSim:
    """One Push-T world in its own pymunk space, built at `state` (7 numbers) with the block at rest."""

    def __init__(self, state, damping: float = 0.0):
        s = [float(v) for v in state]
        self.space = space = pymunk.Space()
        space.damping = damping  # fraction of the block's velocity kept after one second
        t, lo, hi = 100.0, WALL, WORLD_SIZE - WALL  # thick walls so that nothing tunnels through them
        for x0, y0, x1, y1 in [(lo - t, -t, lo, hi + t), (hi, -t, hi + t, hi + t),
                               (-t, lo - t, hi + t, lo), (-t, hi, hi + t, hi + t)]:
            wall = pymunk.Poly(space.static_body, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
            wall.friction = 1.0
            space.add(wall)
        self.agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        self.agent.position, self.agent.velocity = (s[0], s[1]), (s[5], s[6])
        circle = pymunk.Circle(self.agent, AGENT_RADIUS)
        circle.friction = 1.0
        self.block = pymunk.Body()  # mass, moment and centre of gravity follow from the shapes
        self.block.position, self.block.angle = (s[2], s[3]), s[4]
        space.add(self.agent, circle, self.block)
        self.boxes = []
        for (x0, x1, y0, y1), area in zip(T_BOXES, (_BAR_AREA, _STEM_AREA)):
            box = pymunk.Poly(self.block, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
            box.mass, box.friction = area / (_BAR_AREA + _STEM_AREA), 1.0  # total mass 1
            space.add(box)
            self.boxes.append(box)

    def state(self) -> np.ndarray:
        """(7,) agent xy, block xy, block angle (unwrapped), agent velocity."""
        return np.array([*self.agent.position, *self.block.position, self.block.angle, *self.agent.velocity])

    def step(self, ax: float, ay: float) -> None:
        """One control step: 10 PD sub-steps toward target = agent + 100 (ax, ay), kept inside the walls."""
        space, agent, block = self.space, self.agent, self.block
        px, py = agent.position
        vx, vy = agent.velocity
        tx = min(max(px + ACTION_SCALE * ax, _LO), _HI)
        ty = min(max(py + ACTION_SCALE * ay, _LO), _HI)
        for _ in range(SUBSTEPS):
            vx += (KP * (tx - px) - KD * vx) * DT  # PD acceleration integrated into the velocity
            vy += (KP * (ty - py) - KD * vy) * DT
            agent.velocity = (vx, vy)
            bvx, bvy = block.velocity
            space.step(DT)
            self._limit_block_speed(max(vx * vx + vy * vy, bvx * bvx + bvy * bvy))
            px, py = px + vx * DT, py + vy * DT  # the kinematic agent moves by exactly velocity * dt
            bx, by = block.position
            if min(bx, by, WORLD_SIZE - bx, WORLD_SIZE - by) < _NEAR_WALL:  # cheap bounding-circle tests first
                self._keep_in_arena()
                bx, by = block.position
            if (px - bx) ** 2 + (py - by) ** 2 < _NEAR2:
                px, py, vx, vy = self._stop_agent(px, py, vx, vy)
                agent.position = (px, py)
        agent.velocity = (vx, vy)

    def _limit_block_speed(self, speed2: float) -> None:
        """Cap the block's speed at 1.5 x the larger of the agent's and its own previous speed (+ 20 px/s).

        A block wedged between walls and the kinematic agent faces constraints no impulse can meet;
        the solver's accumulated impulses then grow until the block is flung (rarely, but hundreds
        of px in one step). Pushed, a block never outruns its pusher, so such speeds are clipped.
        """
        block = self.block
        limit = 1.5 * math.sqrt(speed2) + 20.0
        bvx, bvy = block.velocity
        speed = math.hypot(bvx, bvy)
        if speed > limit:
            block.velocity = (bvx * limit / speed, bvy * limit / speed)
        if abs(block.angular_velocity) > limit / _MIN_LEVER:
            block.angular_velocity = math.copysign(limit / _MIN_LEVER, block.angular_velocity)

    def _keep_in_arena(self) -> None:
        """Move the block back inside the walls when the agent has squeezed it into one (beyond WALL_SLOP)."""
        bbs = [box.bb for box in self.boxes]
        lo, hi = WALL - WALL_SLOP, WORLD_SIZE - WALL + WALL_SLOP
        dx = max(0.0, lo - min(bb.left for bb in bbs)) - max(0.0, max(bb.right for bb in bbs) - hi)
        dy = max(0.0, lo - min(bb.bottom for bb in bbs)) - max(0.0, max(bb.top for bb in bbs) - hi)
        if dx or dy:
            x, y = self.block.position
            self.block.position = (x + dx, y + dy)
            self.space.reindex_shapes_for_body(self.block)  # refresh the shapes' cached world coordinates

    def _stop_agent(self, px: float, py: float, vx: float, vy: float):
        """Undo the agent's overlap with the block beyond MAX_OVERLAP and its velocity into the block."""
        bx, by = self.block.position
        c, s = math.cos(self.block.angle), math.sin(self.block.angle)
        for cx, cy, hx, hy in _BOX_CENTRES * 2:  # two passes: leaving one box of the T can push into the other
            dx, dy = px - bx, py - by
            lx, ly = c * dx + s * dy - cx, -s * dx + c * dy - cy  # agent centre from the box centre, body frame
            qx, qy = abs(lx) - hx, abs(ly) - hy
            if qx > 0.0 or qy > 0.0:  # outside the box: distance and outward direction to the nearest point
                ox, oy = max(qx, 0.0), max(qy, 0.0)
                dist = math.hypot(ox, oy)
                gx, gy = math.copysign(ox, lx) / dist, math.copysign(oy, ly) / dist
            elif qx > qy:  # inside: leave through the nearest side
                dist, gx, gy = qx, math.copysign(1.0, lx), 0.0
            else:
                dist, gx, gy = qy, 0.0, math.copysign(1.0, ly)
            excess = AGENT_RADIUS - dist - MAX_OVERLAP
            if excess > 0.0:
                nx, ny = c * gx - s * gy, s * gx + c * gy  # outward normal, world frame
                px, py = px + nx * excess, py + ny * excess
                vn = vx * nx + vy * ny
                if vn < 0.0:  # moving into the box
                    vx, vy = vx - vn * nx, vy - vn * ny
        return min(max(px, _LO), _HI), min(max(py, _LO), _HI), vx, vy  # never out through a wall
