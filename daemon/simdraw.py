"""Drawing the simulator's animals and rendering their crops.

:func:`draw_individual` paints one animal once, large and upright; every frame
:func:`render_crop` scales, rotates, blurs and lights that drawing onto a patch
of screen fabric with a flat-bug-style loose mask. Randomness comes only from
the generators passed in, so the same seed gives byte-identical crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

from .simspecies import Species, clip_rgb

__all__ = ["FloatArray", "Individual", "Light", "draw_individual", "noise_tile", "render_crop"]

FloatArray = npt.NDArray[np.float32]

_SS = 2  # supersampling of the master drawing, for smooth edges
_SCREEN = np.array([226.0, 224.0, 230.0], dtype=np.float32)  # the white screen fabric


@dataclass(frozen=True)
class _Look:
    """One individual's own version of its species (drawn once, then transformed)."""

    species: Species
    length: float
    body: tuple[int, int, int]
    accent: tuple[int, int, int]
    jitter: tuple[float, ...]  # marking placement and leg angles, in [-1, 1]


def _individual_look(species: Species, rng: np.random.Generator) -> _Look:
    return _Look(
        species=species,
        length=species.length * float(rng.normal(1.0, 0.04)),
        body=clip_rgb(np.array(species.body) + rng.normal(0.0, 4.0, size=3)),
        accent=clip_rgb(np.array(species.accent) + rng.normal(0.0, 4.0, size=3)),
        jitter=tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=32)),
    )


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return clip_rgb(np.array(colour) * factor)


def _ellipse_poly(
    cx: float, cy: float, rx: float, ry: float, angle_deg: float, n: int = 28
) -> list[tuple[float, float]]:
    """Polygon of an ellipse rotated by ``angle_deg`` (ImageDraw ellipses cannot rotate)."""
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    pts = []
    for k in range(n):
        t = 2.0 * math.pi * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


class _Painter:
    """Draws one individual pointing up, head at the top, on a supersampled canvas."""

    def __init__(self, look: _Look) -> None:
        self.look = look
        self.sp = look.species
        self.u = look.length * _SS
        self.size = math.ceil(self.u * 2.7) | 1
        self.cx = self.size / 2.0
        self.cy = self.size / 2.0
        self.base = Image.new("RGBA", (self.size, self.size), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.base)
        self.wings = Image.new("RGBA", (self.size, self.size), (0, 0, 0, 0))
        self.wdraw = ImageDraw.Draw(self.wings)
        self.dark = _shade(look.body, 0.55)
        self.line = max(1, round(self.u * 0.022))
        self._j = 0

    def j(self) -> float:
        """Next jitter value of this individual, in [-1, 1]."""
        value = self.look.jitter[self._j % len(self.look.jitter)]
        self._j += 1
        return value

    def ell(
        self, x: float, y: float, rx: float, ry: float, fill: tuple[int, ...], wing: bool = False
    ) -> None:
        """Upright ellipse in body units, on the body or the wing layer."""
        target = self.wdraw if wing else self.draw
        target.ellipse(
            [
                self.cx + x * self.u - rx * self.u,
                self.cy + y * self.u - ry * self.u,
                self.cx + x * self.u + rx * self.u,
                self.cy + y * self.u + ry * self.u,
            ],
            fill=fill,
        )

    def poly(
        self, pts: Sequence[tuple[float, float]], fill: tuple[int, ...], wing: bool = False
    ) -> None:
        """Filled polygon in body units."""
        target = self.wdraw if wing else self.draw
        target.polygon([(self.cx + x * self.u, self.cy + y * self.u) for x, y in pts], fill=fill)

    def seg(
        self,
        pts: Sequence[tuple[float, float]],
        fill: tuple[int, ...],
        width: int,
        wing: bool = False,
    ) -> None:
        """Polyline (legs, antennae, stripes) in body units."""
        target = self.wdraw if wing else self.draw
        target.line(
            [(self.cx + x * self.u, self.cy + y * self.u) for x, y in pts],
            fill=fill,
            width=width,
            joint="curve",
        )

    def legs(self, y0: float, y1: float, reach: float, thin: float = 1.0) -> None:
        """Three pairs of two-segment legs attached between y0 and y1."""
        width = max(1, round(self.line * thin))
        for k in range(3):
            ya = y0 + (y1 - y0) * k / 2.0
            forward = (1 - k) * 0.9  # front legs point forward, hind legs back
            for side in (-1.0, 1.0):
                ang = math.radians(90 - 40 * forward + 8 * self.j())
                kx, ky = math.sin(ang) * reach * 0.45, -math.cos(ang) * reach * 0.45
                fx = kx + reach * 0.5 * 0.35
                fy = ky - forward * reach * 0.5 * 0.9 + (0.25 if k == 2 else 0.05) * reach * 0.5
                self.seg(
                    [(0.0, ya), (side * kx, ya + ky), (side * fx, ya + fy)],
                    (*self.dark, 255),
                    width,
                )

    def antennae(self, y: float, length: float, spread: float = 30.0) -> None:
        for side in (-1.0, 1.0):
            ang = math.radians(spread + 6 * self.j())
            mid = (side * math.sin(ang) * length * 0.5, y - math.cos(ang) * length * 0.5)
            end = (side * math.sin(ang * 1.4) * length, y - math.cos(ang * 1.4) * length)
            self.seg([(0.0, y), mid, end], (*self.dark, 255), max(1, self.line // 2 + 1))

    def bands(
        self,
        x: float,
        y: float,
        rx: float,
        ry: float,
        count: int,
        size: float,
        colour: tuple[int, int, int],
    ) -> None:
        """Transverse stripes across an upright ellipse, kept inside it."""
        for k in range(count):
            t = (k + 1) / (count + 1) * 1.6 - 0.8 + 0.04 * self.j()
            yy = y + t * ry
            half = rx * math.sqrt(max(0.0, 1.0 - t * t)) * 0.95
            self.poly(
                [
                    (x - half, yy - size / 2),
                    (x + half, yy - size / 2),
                    (x + half, yy + size / 2),
                    (x - half, yy + size / 2),
                ],
                (*colour, 255),
            )

    def spots(
        self,
        x: float,
        y: float,
        rx: float,
        ry: float,
        count: int,
        size: float,
        colour: tuple[int, int, int],
        paired: bool = True,
    ) -> None:
        """Spots scattered inside an upright ellipse (in mirrored pairs if ``paired``)."""
        for k in range(count):
            t = (k + 0.5) / count * 1.4 - 0.7 + 0.06 * self.j()
            off = (0.45 + 0.1 * self.j()) * rx * math.sqrt(max(0.0, 1 - t * t))
            for side in (-1.0, 1.0) if paired else (0.0,):
                self.ell(x + side * off, y + t * ry, size * 0.8, size * 0.8, (*colour, 255))

    def render(self) -> Image.Image:
        """Draw the plan; returns the animal on a transparent canvas, cropped tight."""
        getattr(self, "_" + self.sp.plan)()
        self.base.alpha_composite(self.wings)
        size = max(1, round(self.size / _SS))
        out = self.base.resize((size, size), Image.Resampling.LANCZOS)
        box = out.getbbox()
        return out.crop(box) if box else out

    # One method per plan. Units: body length = 1, head at y = -0.5, tail at +0.5.

    def _moth(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.3, -0.18, 0.35 * sp.leg_length)
        self.antennae(-0.42, 0.35 * sp.antenna_length, 25)
        self.ell(0.0, 0.05, 0.07 * w, 0.3, (*self.dark, 255))
        span = 0.62 * w
        for side in (-1.0, 1.0):
            wing = [
                (0.0, -0.34),
                (side * span, 0.18 + 0.02 * self.j()),
                (side * span * 0.7, 0.45),
                (0.0, 0.38),
            ]
            self.poly(wing, (*b, 255), wing=True)
            lighter = _shade(b, 1.15)
            self.poly(
                [(0.0, -0.3), (side * span * 0.85, 0.2), (side * span * 0.4, 0.25)],
                (*lighter, 255),
                wing=True,
            )
            for k in range(sp.marks if sp.marking == "stripes" else 1):
                f = 0.35 + 0.5 * (k + 1) / (sp.marks + 1) + 0.02 * self.j()
                a = (side * span * f * 0.2, -0.34 + 0.72 * f)  # along the inner edge
                c = (side * span * f, -0.34 + 0.52 * f)  # along the leading edge
                if sp.marking == "spots":
                    for s in range(sp.marks):
                        g = 0.3 + 0.5 * s / max(1, sp.marks - 1)
                        px, py = a[0] + (c[0] - a[0]) * g, a[1] + (c[1] - a[1]) * g
                        self.ell(
                            px,
                            py,
                            sp.mark_size * 0.7,
                            sp.mark_size * 0.7,
                            (*self.look.accent, 255),
                            wing=True,
                        )
                else:
                    width = max(1, round(self.u * sp.mark_size * 0.45))
                    self.seg([a, c], (*self.look.accent, 255), width, wing=True)
        self.ell(0.0, -0.24, 0.09 * w, 0.12, (*_shade(b, 0.9), 255), wing=True)
        self.ell(0.0, -0.4, 0.06 * w, 0.06, (*self.dark, 255), wing=True)

    def _beetle(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.2, 0.1, 0.6 * sp.leg_length)
        self.antennae(-0.42, 0.28 * sp.antenna_length, 35)
        self.ell(0.0, -0.42, 0.1 * w, 0.08, (*self.dark, 255))
        self.ell(0.0, -0.28, 0.2 * w, 0.1, (*_shade(b, 0.8), 255))
        ex, ey, rx, ry = 0.0, 0.14, 0.3 * w, 0.34
        self.ell(ex, ey, rx, ry, (*b, 255))
        ms = sp.mark_size
        if sp.marking == "spots":
            self.spots(ex, ey, rx, ry, sp.marks, ms, self.look.accent)
        elif sp.marking == "stripes":
            for k in range(sp.marks):
                off = (k + 1) / (sp.marks + 1) * rx * 0.9 + 0.01 * self.j()
                for side in (-1.0, 1.0):
                    self.seg(
                        [(side * off, ey - ry * 0.7), (side * off, ey + ry * 0.7)],
                        (*self.look.accent, 255),
                        max(1, round(self.u * ms * 0.4)),
                    )
        else:
            self.bands(ex, ey, rx, ry, 1 + sp.marks // 3, ms * 1.6, self.look.accent)
        self.seg([(0.0, ey - ry), (0.0, ey + ry)], (*self.dark, 255), self.line)

    def _fly(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.22, -0.02, 0.55 * sp.leg_length)
        for side in (-1.0, 1.0):
            ang = side * (28 + 5 * self.j())
            self.poly(_ellipse_poly(side * 0.2 * w, 0.12, 0.11, 0.32, -ang), sp.wing, wing=True)
        self.ell(0.0, 0.18, 0.17 * w, 0.27, (*b, 255))
        if sp.marking == "stripes":
            self.bands(0.0, 0.18, 0.17 * w, 0.27, sp.marks, sp.mark_size, self.look.accent)
        else:
            self.spots(0.0, 0.18, 0.17 * w, 0.27, sp.marks, sp.mark_size * 0.8, self.look.accent)
        self.ell(0.0, -0.14, 0.15 * w, 0.15, (*_shade(b, 0.85), 255))
        for side in (-1.0, 1.0):
            self.seg(
                [(side * 0.05 * w, -0.24), (side * 0.05 * w, -0.04)],
                (*self.look.accent, 255),
                max(1, round(self.u * 0.02)),
            )
        self.ell(0.0, -0.36, 0.13 * w, 0.09, (*self.dark, 255))
        eye = (150, 40, 30) if sum(b) > 200 else (120, 30, 25)
        for side in (-1.0, 1.0):
            self.ell(side * 0.08 * w, -0.37, 0.065, 0.075, (*eye, 255))

    def _slender(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.26, -0.14, 0.95 * sp.leg_length, thin=0.6)
        self.antennae(-0.42, 0.3 * sp.antenna_length, 20)
        for side in (-1.0, 1.0):
            ang = side * (22 + 5 * self.j())
            self.poly(_ellipse_poly(side * 0.14, 0.02, 0.06, 0.3, -ang), sp.wing, wing=True)
            if sp.marking == "spots":
                self.ell(
                    side * 0.2,
                    0.0 + 0.02 * self.j(),
                    sp.mark_size * 0.6,
                    sp.mark_size * 0.6,
                    (*self.look.accent, 200),
                    wing=True,
                )
        self.ell(0.0, 0.18, 0.055 * w, 0.32, (*b, 255))
        if sp.marking == "stripes":
            self.bands(0.0, 0.18, 0.055 * w, 0.32, sp.marks, sp.mark_size * 0.7, self.look.accent)
        self.ell(0.0, -0.2, 0.09 * w, 0.1, (*_shade(b, 0.85), 255))
        self.ell(0.0, -0.36, 0.055 * w, 0.05, (*self.dark, 255))

    def _wasp(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.25, -0.08, 0.6 * sp.leg_length)
        self.antennae(-0.42, 0.35 * sp.antenna_length, 30)
        self.ell(0.0, 0.22, 0.14 * w, 0.24, (*b, 255))
        if sp.marking == "stripes":
            self.bands(0.0, 0.22, 0.14 * w, 0.24, sp.marks, sp.mark_size, self.look.accent)
        else:
            self.spots(0.0, 0.22, 0.14 * w, 0.24, sp.marks, sp.mark_size * 0.7, self.look.accent)
        self.seg([(0.0, -0.06), (0.0, 0.0)], (*self.dark, 255), max(1, round(self.u * 0.03)))
        self.ell(0.0, -0.17, 0.11 * w, 0.12, (*_shade(b, 0.75), 255))
        self.ell(0.0, -0.36, 0.1 * w, 0.08, (*self.look.accent, 255))
        for side in (-1.0, 1.0):
            ang = side * (10 + 4 * self.j())
            self.poly(_ellipse_poly(side * 0.09, 0.05, 0.06, 0.27, -ang), sp.wing, wing=True)

    def _shieldbug(self) -> None:
        sp, w, b = self.sp, self.sp.width, self.look.body
        self.legs(-0.12, 0.12, 0.5 * sp.leg_length)
        self.antennae(-0.44, 0.4 * sp.antenna_length, 30)
        self.poly(
            [(-0.06 * w, -0.46), (0.06 * w, -0.46), (0.1 * w, -0.32), (-0.1 * w, -0.32)],
            (*self.dark, 255),
        )
        shield = [
            (-0.14 * w, -0.34),
            (0.14 * w, -0.34),
            (0.32 * w, -0.12),
            (0.28 * w, 0.25),
            (0.0, 0.48),
            (-0.28 * w, 0.25),
            (-0.32 * w, -0.12),
        ]
        self.poly(shield, (*b, 255))
        self.poly([(-0.16 * w, -0.12), (0.16 * w, -0.12), (0.0, 0.2)], (*_shade(b, 0.85), 255))
        ms = sp.mark_size
        if sp.marking == "spots":
            self.spots(0.0, 0.06, 0.26 * w, 0.3, sp.marks, ms * 0.8, self.look.accent)
        elif sp.marking == "band":
            self.bands(0.0, 0.0, 0.3 * w, 0.3, 1 + sp.marks // 3, ms * 1.2, self.look.accent)
        else:
            for k in range(sp.marks):
                off = (k + 1) / (sp.marks + 1) * 0.24 * w
                for side in (-1.0, 1.0):
                    self.seg(
                        [(side * off, -0.3), (side * off * 0.5, 0.3)],
                        (*self.look.accent, 255),
                        max(1, round(self.u * ms * 0.35)),
                    )


def draw_individual(species: Species, rng: np.random.Generator) -> Image.Image:
    """One individual of ``species`` (its own size and colour jitter from ``rng``),
    pointing up on a transparent RGBA canvas cropped tight; pixels, not supersampled."""
    return _Painter(_individual_look(species, rng)).render()


@dataclass
class Individual:
    """Mutable state of one animal while it is on the screen.

    Position ``cx, cy`` in frame px, ``angle`` in degrees, ``scale`` relative to its
    drawing. ``blur_next`` is the classic behaviour's blur flag; ``blur_px`` (px, 0 =
    sharp) and ``blur_angle`` (degrees) the trap behaviour's motion blur of this frame.
    ``moved`` says it moved more than a drift since it was last detected, ``stepped``
    that it moved in this frame (a still period's first frame can be a hop's); ``visit``
    counts its visits (0 first; ``visits`` is how many have begun). ``heading``
    (radians) and ``speed`` (px/s) describe the walk it is on unless ``still``;
    ``missing`` says the detector missed it in the last frame.
    """

    ident: int
    species: Species
    master: Image.Image
    cx: float
    cy: float
    angle: float
    scale: float
    home_scale: float
    blur_next: bool = False
    blur_px: int = 0
    blur_angle: float = 0.0
    moved: bool = False
    visit: int = 0
    visits: int = 0
    still: bool = False
    stepped: bool = False
    heading: float = 0.0
    speed: float = 0.0
    missing: bool = False


@dataclass(frozen=True)
class Light:
    """Light of one frame: colour gains for the session drift and this frame's flicker."""

    gains: tuple[float, float, float]


_NOISE_SIZE = 512


def noise_tile(seed: int) -> FloatArray:
    """Unit normal noise shared by all crops of a run (channel 0 grain, 1-3 sensor).

    Drawing fresh normals for every crop would cost more than the rest of its
    rendering; a random window of one big tile looks just as random.
    """
    rng = np.random.default_rng([seed, 0x9015E])
    return rng.standard_normal(size=(_NOISE_SIZE, _NOISE_SIZE, 4), dtype=np.float32)


def _noise_window(tile: FloatArray, h: int, w: int, rng: np.random.Generator) -> FloatArray:
    if h > tile.shape[0] or w > tile.shape[1]:
        return rng.standard_normal(size=(h, w, 4), dtype=np.float32)
    y = int(rng.integers(0, tile.shape[0] - h + 1))
    x = int(rng.integers(0, tile.shape[1] - w + 1))
    return tile[y : y + h, x : x + w]


def render_crop(
    ind: Individual,
    light: Light,
    frame_size: tuple[int, int],
    noise: FloatArray,
    rng: np.random.Generator,
    *,
    classic_blur: bool = True,
) -> tuple[Image.Image, int, bool]:
    """The crop of one individual in one frame, its mask area in pixels, and whether it
    is motion-blurred.

    With ``classic_blur`` blur follows the classic behaviour (``ind.blur_next``, else
    4 % motion and 5 % focus blur at random); without it only ``ind.blur_px`` (the
    trap behaviour's movement) blurs, along ``ind.blur_angle``.
    """
    master = ind.master
    # Slight anisotropic squash: the animal tilts a little relative to the camera.
    sx = ind.scale * float(rng.normal(1.0, 0.02))
    sy = ind.scale * float(rng.normal(1.0, 0.02))
    size = (max(4, round(master.width * sx)), max(4, round(master.height * sy)))
    im = master.resize(size, Image.Resampling.BICUBIC)
    im = im.rotate(ind.angle, resample=Image.Resampling.BICUBIC, expand=True)

    extent = max(im.width, im.height)
    halo = max(2.0, 0.07 * extent) * float(rng.uniform(0.7, 1.4))
    pad = math.ceil(halo * 2) + 4
    h, w = im.height + 2 * pad, im.width + 2 * pad
    insect = np.zeros((h, w, 4), dtype=np.float32)
    insect[pad : pad + im.height, pad : pad + im.width] = np.asarray(im, dtype=np.float32)
    alpha = insect[..., 3:4] * np.float32(1.0 / 255.0)

    # flat-bug's masks are loose: a blobby halo of screen around the animal.
    solid = Image.fromarray(((alpha[..., 0] > 0.25) * 255).astype(np.uint8), "L")
    spread = np.asarray(solid.filter(ImageFilter.GaussianBlur(halo)), dtype=np.float32)
    wobble = rng.integers(0, 256, size=(6, 6)).astype(np.uint8)
    wobble_full = np.asarray(
        Image.fromarray(wobble, "L").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32
    )
    mask = spread > (12.0 + wobble_full * 0.12)
    mask |= alpha[..., 0] > 0.02

    # Screen fabric: slight shading plus grain, then the animal over it.
    grain = _noise_window(noise, h, w, rng)
    screen = _SCREEN + rng.normal(0.0, 4.0, size=3).astype(np.float32)
    background = screen + (wobble_full[..., None] * np.float32(16.0 / 255.0) - 8.0)
    background += grain[..., :1] * np.float32(9.0)
    rgb = background + (insect[..., :3] - background) * alpha

    motion = False
    # Classic draws its roll even when blur_next decides, to keep its random sequence.
    blur_roll = rng.random() if classic_blur else 1.0
    if not classic_blur:
        if ind.blur_px > 0:
            rgb, motion = _motion_blur(rgb, ind.blur_angle, ind.blur_px), True
    elif ind.blur_next or blur_roll < 0.04:
        rgb = _motion_blur(rgb, float(rng.uniform(0, 180)), int(rng.integers(3, 9)))
        motion = True
    elif blur_roll < 0.09:
        radius = float(rng.uniform(0.8, 2.2))
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)

    # The lamp is brightest in the middle of the screen.
    fx = ind.cx / frame_size[0] - 0.5
    fy = ind.cy / frame_size[1] - 0.5
    falloff = 1.0 - 0.35 * (fx * fx + fy * fy)
    gains = np.array(light.gains, dtype=np.float32) * np.float32(falloff)
    rgb = rgb * gains + grain[..., 1:] * np.float32(2.5)

    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = np.clip(rgb, 0, 255).astype(np.uint8) * mask[..., None]
    out[..., 3] = mask * np.uint8(255)
    crop = Image.fromarray(out, "RGBA")
    box = crop.getchannel("A").getbbox()
    if box is not None:
        crop = crop.crop(box)
    return crop, int(np.count_nonzero(mask)), motion


def _motion_blur(rgb: FloatArray, angle_deg: float, length: int) -> FloatArray:
    """Average of copies shifted along a line: the animal moved during the exposure."""
    dx, dy = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    acc = np.zeros_like(rgb)
    for k in range(length):
        t = k - (length - 1) / 2.0
        acc += np.roll(rgb, (round(t * dy), round(t * dx)), axis=(0, 1))
    return acc / float(length)
