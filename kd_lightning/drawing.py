"""Pictures drawn straight into pixels with Pillow, for the images every run writes: the TensorBoard figures
(tensorboard_figures.py) and the model card's card.png (card.py).

A matplotlib figure of the same panels cost 0.4 s (card.png) to 2 s (the TensorBoard figures) per run, most of it
laying out text; these take a few milliseconds. The sweep report's heatmap and curves, drawn once per sweep, stay
matplotlib figures (report.py). matplotlib still lends its font (DejaVu Sans) and its "Blues" colour map.
"""

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (110, 110, 110), (225, 225, 225), (255, 255, 255)
TEACHER_COLOUR, STUDENT_COLOUR, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)  # matplotlib's tab: colours


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib) at `size` pixels; Pillow's own font if it cannot be read."""
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size)


def text_width(text: str, size: int) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return int(right - left)


def vertical_text(image: Image.Image, centre: tuple[int, int], text: str, size: int,
                  fill: tuple[int, int, int] = BLACK) -> None:
    """`text` rotated by 90 degrees (read bottom to top), centred on `centre`, over what is drawn there."""
    w, h = text_width(text, size) + 4, size + 6
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((w // 2, h // 2), text, fill=255, font=font(size), anchor="mm")
    mask = mask.rotate(90, expand=True)
    image.paste(fill, (centre[0] - mask.width // 2, centre[1] - mask.height // 2), mask)


def tick_classes(n: int) -> range:
    """Every class up to 20 classes, else about ten evenly spaced ones."""
    return range(0, n, 1 if n <= 20 else -(-n // 10))


def blues(values: np.ndarray) -> np.ndarray:
    """matplotlib's "Blues" colour map, uint8 RGB, for values in [0, 1]."""
    return (matplotlib.colormaps["Blues"](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def tinted(colour: tuple[int, int, int], opacity: float) -> tuple[int, int, int]:
    """`colour` at `opacity` over white."""
    return tuple(round(c * opacity + 255 * (1 - opacity)) for c in colour)


def superscript(n: int) -> str:
    return str(n).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


class Chart:
    """Axes in pixels: a frame at `box` (left, top, right, bottom) of `image` showing x in `xlim` (log10-scaled with
    `log_x`) and y in `ylim`, with ticks, axis labels and a title drawn around it; `xy` maps data to pixels."""

    def __init__(self, image: Image.Image, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float], *, log_x: bool = False) -> None:
        self.image, self.draw = image, ImageDraw.Draw(image)
        self.box, self.xlim, self.ylim, self.log_x = box, xlim, ylim, log_x

    def x(self, value: float) -> float:
        lo, hi = (math.log10(v) for v in self.xlim) if self.log_x else self.xlim
        value = math.log10(value) if self.log_x else value
        return self.box[0] + (value - lo) / (hi - lo) * (self.box[2] - self.box[0])

    def y(self, value: float) -> float:
        lo, hi = self.ylim
        return self.box[3] - (value - lo) / (hi - lo) * (self.box[3] - self.box[1])

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.x(x), self.y(y)

    def axes(self, title: str, xlabel: str, ylabel: str, xticks: Sequence[float], yticks: Sequence[float],
             xtick_labels: Sequence[str] | None = None) -> None:
        left, top, right, bottom = self.box
        self.draw.rectangle(self.box, outline=BLACK)
        for value, label in zip(xticks, xtick_labels or [f"{v:g}" for v in xticks]):
            x = round(self.x(value))
            self.draw.line((x, bottom, x, bottom + 4), fill=BLACK)
            self.draw.text((x, bottom + 6), label, fill=BLACK, font=font(12), anchor="ma")
        for value in yticks:
            y = round(self.y(value))
            self.draw.line((left - 4, y, left, y), fill=BLACK)
            self.draw.text((left - 7, y), f"{value:g}", fill=BLACK, font=font(12), anchor="rm")
        self.draw.text(((left + right) // 2, bottom + 26), xlabel, fill=BLACK, font=font(14), anchor="ma")
        vertical_text(self.image, (left - 48, (top + bottom) // 2), ylabel, 14)
        self.draw.text(((left + right) // 2, top - 10), title, fill=BLACK, font=font(15), anchor="md")

    def bar(self, x: float, width: float, height: float, fill: tuple[int, int, int],
            outline: tuple[int, int, int] | None = None) -> None:
        """A bar from y = 0 (or the bottom of the frame) to `height`, centred on x."""
        x0, x1 = round(self.x(x - width / 2)), round(self.x(x + width / 2)) - 1
        y0, y1 = round(self.y(height)), round(self.y(max(self.ylim[0], 0)))
        if y1 - y0 >= 1 or outline is not None:
            self.draw.rectangle((x0, min(y0, y1), max(x0, x1), y1), fill=fill, outline=outline)

    def dashed_line(self, start: tuple[float, float], end: tuple[float, float], fill: tuple[int, int, int],
                    dash: int = 7, gap: int = 5) -> None:
        (x0, y0), (x1, y1) = self.xy(*start), self.xy(*end)
        length = math.hypot(x1 - x0, y1 - y0)
        for a in np.arange(0, length, dash + gap):
            b = min(a + dash, length)
            self.draw.line((x0 + (x1 - x0) * a / length, y0 + (y1 - y0) * a / length,
                            x0 + (x1 - x0) * b / length, y0 + (y1 - y0) * b / length), fill=fill, width=2)

    def marker(self, x: float, y: float, shape: str, radius: int, fill: tuple[int, int, int]) -> None:
        """A filled "o" (circle) or "s" (square) of `radius` pixels at data point (x, y)."""
        px, py = self.xy(x, y)
        corners = (px - radius, py - radius, px + radius, py + radius)
        (self.draw.ellipse if shape == "o" else self.draw.rectangle)(corners, fill=fill)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int], str]], corner: str,
               avoid: Sequence[tuple[float, float]] = ()) -> None:
        """A boxed key of (kind, colour, label) entries, kind "bar", "dash", "o" or "s", in the frame's `corner`
        ("upper left", "upper right", "lower right", "lower left"), or in the first other corner where it covers
        none of the data points `avoid`."""
        size, row, swatch = 11, 17, 22
        width = swatch + 14 + max(text_width(label, size) for _, _, label in entries)
        height = row * len(entries) + 8
        left, top, right, bottom = self.box

        def place(corner: str) -> tuple[int, int]:
            return (left + 6 if corner.endswith("left") else right - 6 - width,
                    top + 6 if corner.startswith("upper") else bottom - 6 - height)

        def clear(corner: str, pad: int = 14) -> bool:
            x0, y0 = place(corner)
            return not any(x0 - pad <= px <= x0 + width + pad and y0 - pad <= py <= y0 + height + pad
                           for px, py in (self.xy(*point) for point in avoid))

        corners = [corner, *(c for c in ("upper right", "upper left", "lower right", "lower left") if c != corner)]
        x0, y0 = place(next((c for c in corners if clear(c)), corner))
        self.draw.rectangle((x0, y0, x0 + width, y0 + height), fill=WHITE, outline=LIGHT)
        for k, (kind, colour, label) in enumerate(entries):
            cx, cy = x0 + 6 + swatch // 2, y0 + 4 + row * k + row // 2
            if kind == "bar":
                self.draw.rectangle((cx - 9, cy - 5, cx + 9, cy + 5), fill=colour, outline=BLACK)
            elif kind == "dash":
                self.draw.line((cx - 10, cy, cx - 3, cy), fill=colour, width=2)
                self.draw.line((cx + 3, cy, cx + 10, cy), fill=colour, width=2)
            else:
                r = 5 if kind == "o" else 4
                (self.draw.ellipse if kind == "o" else self.draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=colour)
            self.draw.text((x0 + swatch + 10, cy), label, fill=BLACK, font=font(size), anchor="lm")
